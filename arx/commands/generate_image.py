"""arx generate BUNDLE --class N --image out.png [--cfg S] [--batch K]: image-token bundles.

Everything a user can get wrong (a text bundle, a class outside the classes, a negative
guidance scale, an unwritable path) is refused in one line before the loop runs; the PNG is
written atomically after it, so nothing is half-written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager

from arx.errors import ArxError

IMAGE_FLAGS = ("image", "cfg", "cfg_schedule", "batch", "zoom", "relax")


def register_image_args(p) -> None:
    g = p.add_argument_group("image-token bundles")
    g.add_argument("--image", metavar="PATH.png",
                   help="write the image (a grid for several); a PATH with {i} writes one per image")
    g.add_argument("--cfg", type=float, metavar="S",
                   help="classifier-free guidance scale (default: the bundle's; 1 turns it off)")
    g.add_argument("--cfg-schedule", choices=["constant", "linear"],
                   help="linear: the scale rises from 1 at the first token to S at the last")
    g.add_argument("--batch", type=int, metavar="K", help="images per --class (default 1)")
    g.add_argument("--zoom", type=int, metavar="N",
                   help="repeat pixels N times in the PNG (default: to at least 128 pixels)")
    g.add_argument("--relax", metavar="K,DELTA",
                   help="with --speculate jacobi: LANTERN's relaxed acceptance, a guess borrows "
                        "up to DELTA of probability from its K nearest codes (faster, inexact)")


def wants_image(args) -> bool:
    return args.class_ is not None or any(getattr(args, f) is not None for f in IMAGE_FLAGS)


def run_image(args, manifest, generate_options) -> int:
    """generate_options(args, defaults): the text command's flag mapping (sampling flags)."""
    from arx.runtime.image_generate import ImageOptions, check_classes, image_info
    from arx.runtime.image_output import check_image_path
    from arx.runtime.image_speculative import parse_jacobi
    from arx.runtime.relaxed_acceptance import relaxation_for

    info = image_info(manifest, args.bundle)
    _refuse_text_flags(args, allowed=("engine",))  # the image loop runs on an engine session
    window = parse_jacobi(args.speculate)
    relax = _relax_request(args, window)
    if args.class_ is None and not info.text:
        raise ArxError(f"{args.bundle} is class-conditional: give --class N "
                       f"(0..{info.num_classes - 1}) instead of a prompt")
    check_output_flags(args)
    if info.text:  # Janus: prompts are the condition (arx/commands/generate_janus.py)
        from arx.commands.generate_janus import prompt_ids

        classes = prompt_ids(args, manifest, info.condition)
    else:
        classes = [c for c in args.class_ for _ in range(args.batch or 1)]
        check_classes(info, classes)
    paths = _paths(args.image, len(classes))
    for path in paths:
        check_image_path(path)
    # image models sample unless told --greedy, with the model's top-k/temperature (LlamaGen:
    # temperature 1, top-k 2000 of 16384 codes)
    defaults = dataclasses.replace(manifest.generation, do_sample=True, top_k=info.top_k,
                                   temperature=info.temperature)
    options = ImageOptions(cfg_scale=info.cfg_scale if args.cfg is None else args.cfg,
                           cfg_schedule=args.cfg_schedule or "constant",
                           sampling=generate_options(args, defaults).sampling)
    if relax is not None and not info.text:  # Janus refuses Jacobi speculation (generate_janus)
        relax = relaxation_for(args.bundle, manifest, info, *relax)
    result = _generate(args, manifest, info, classes, options, window, relax)
    if paths:
        _write(paths, result, info, args.zoom)
    if args.json:
        print(json.dumps(_as_json(result, info, paths)))
    _summary(result, paths)
    return 0


def _relax_request(args, window) -> tuple[int, float] | None:
    from arx.runtime.relaxed_acceptance import parse_relax

    relax = parse_relax(args.relax)
    if relax is not None and window is None:
        raise ArxError("--relax relaxes the acceptance of Jacobi guesses: add --speculate "
                       "jacobi[:W], or drop --relax")
    return relax


def check_output_flags(args) -> None:
    """--batch and --zoom >= 1, and somewhere for the images to go (also next-scale bundles)."""
    if args.batch is not None and args.batch < 1 or args.zoom is not None and args.zoom < 1:
        raise ArxError("--batch and --zoom must be >= 1")
    if args.image is None and not args.json:
        raise ArxError("give --image PATH.png (or --json for the token grid)")


# text-generation flags with no meaning for an image (a fixed grid, no EOS, no draft model:
# images speculate with Jacobi guesses): refused rather than ignored
TEXT_ONLY = {"max_new_tokens": "--max-new-tokens", "no_eos_stop": "--no-eos-stop",
             "repetition_penalty": "--repetition-penalty", "engine": "--engine",
             "draft": "--draft", "lookup": "--lookup"}


def _refuse_text_flags(args, allowed: tuple[str, ...] = ()) -> None:
    given = [flag for name, flag in TEXT_ONLY.items()
             if name not in allowed and getattr(args, name, None) not in (None, False)]
    if given:
        raise ArxError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to an "
                       f"image-token bundle (a fixed grid of tokens, run on ONNX Runtime); drop "
                       f"{'it' if len(given) == 1 else 'them'}")


def _paths(image: str | None, n: int) -> list[str]:
    if image is None:
        return []
    if "{i}" in image:
        return [image.replace("{i}", str(i)) for i in range(n)]
    return [image]


def _generate(args, manifest, info, classes, options, window, relax=None):
    from arx.runtime.backend import BackendOptions
    from arx.runtime.image_generate import decode_pixels, generate_images
    from arx.runtime.image_speculative import generate_images_jacobi

    backend = BackendOptions(device=args.device, intra_op_threads=args.threads,
                             spin_wait=not args.no_spin)
    if window is not None and args.engine:
        raise ArxError("--speculate jacobi runs on ONNX Runtime (it verifies every guessed "
                       "position); drop --engine or the speculation")
    with _session(args, manifest, backend) as session:
        if info.text:
            from arx.commands.generate_janus import generate_from_prompts

            result = generate_from_prompts(args, session, classes, options, window)
        else:
            result = (generate_images(session, classes, options) if window is None else
                      generate_images_jacobi(session, classes, options, window, relax))
    t = time.perf_counter()
    result.pixels = decode_pixels(args.bundle, info, manifest, result.tokens, backend)
    result.vq_s = time.perf_counter() - t
    return result


@contextmanager
def _session(args, manifest, backend):
    """The bundle's decoder on ONNX Runtime, or with --engine the TensorRT engine `arx build`
    made for it (runtime/image_engine.py; the VQ decoder stays on ONNX Runtime)."""
    from arx.runtime.decoder import DecoderSession

    if not args.engine:
        with DecoderSession(args.bundle, backend, manifest) as session:
            yield session
        return
    from arx.runtime.engine_session import open_engine
    from arx.runtime.image_engine import ImageEngineSession

    with open_engine(args.bundle, args.engine) as engine:
        session = ImageEngineSession(engine, args.bundle, backend)
        try:
            yield session
        finally:
            session.close()


def _write(paths, result, info, zoom) -> None:
    from arx.runtime.image_output import grid, to_uint8, write_png

    images = to_uint8(result.pixels, info.pixel_range)  # (B, H, W, C)
    pictures = [grid(images)] if len(paths) == 1 else list(images)
    for path, picture in zip(paths, pictures):
        write_png(path, picture, zoom or max(1, -(-128 // min(picture.shape[:2]))))


def _as_json(result, info, paths) -> dict:
    key = "prompt" if info.text else "class"
    return {"images": [{key: c, "seed": s, "tokens": t.tolist()}
                       for c, s, t in zip(result.classes, result.seeds, result.tokens)],
            "grid": list(info.grid), "files": paths,
            "time_to_first_image_token_s": result.first_token_s,
            "image_tokens_per_s": result.image_tokens_per_s,
            "seconds_per_image": result.seconds_per_image,
            "tokens_s": result.tokens_s, "vq_decoder_s": result.vq_s,
            **({"speculation": result.speculation.to_json()}
               if hasattr(result, "speculation") else {})}


def _summary(result, paths) -> None:
    where = f" -> {', '.join(paths)}" if paths else ""
    print(f"[{len(result.classes)} images of {result.tokens[0].size} tokens{where}, first token "
          f"after {result.first_token_s * 1e3:.0f} ms, {result.image_tokens_per_s:.1f} image "
          f"tokens/s, {result.seconds_per_image:.2f} s per image (VQ decoder "
          f"{result.vq_s * 1e3:.0f} ms)]", file=sys.stderr)
