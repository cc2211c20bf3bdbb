"""arx generate BUNDLE --prompt TEXT --image out.png [--cfg S]: text-to-image (Janus) bundles.

The prompt is tokenized by the bundle's tokenizer as given, then framed as Janus' processor
frames it for image mode: BOS first, the image-start token (BOI) last. Janus' chat template
("<|User|>: TEXT\\n\\n<|Assistant|>:") is the user's to write into TEXT, as transformers' own
example applies it before the processor. Everything else (guidance, sampling, outputs, the
refusals) is the class-conditional command's (arx/commands/generate_image.py).
"""

from __future__ import annotations

from arx.errors import ArxError


def prompt_ids(args, manifest, condition: dict) -> list[list[int]]:
    """The image prompts, BOS ... BOI each; one line for a missing tokenizer or prompt."""
    from arx.commands.generate import _parse_ids
    from arx.runtime.janus_generate import image_prompt

    if args.class_ is not None:
        raise ArxError(f"{args.bundle} draws from a text prompt: give --prompt TEXT "
                       f"(or --prompt-ids), not --class")
    if args.prompt is None and args.prompt_ids is None:
        raise ArxError(f"{args.bundle} draws from a text prompt: give --prompt TEXT")
    if args.prompt is not None:
        from arx.runtime.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_bundle(args.bundle, manifest.tokenizer)
        raw = tokenizer.encode_batch(args.prompt)
    else:
        raw = [_parse_ids(t) for t in args.prompt_ids]
    return [image_prompt(ids, condition) for ids in raw for _ in range(args.batch or 1)]


def generate_from_prompts(args, session, prompts, options, window=None):
    """On `session`: the bundle's decoder on ORT, or its engine (runtime/image_engine.py)."""
    from arx.runtime.janus_generate import generate_images_from_prompts

    if window is not None:
        raise ArxError("--speculate jacobi is built for class-conditional image bundles; drop "
                       "it for a text-to-image bundle")
    result = generate_images_from_prompts(session, prompts, options)
    texts = args.prompt if args.prompt is not None else args.prompt_ids
    result.classes = [t for t in texts for _ in range(args.batch or 1)]  # what --json shows
    return result
