"""Text-to-image (Janus bundles, export/janus.py): prompts as the condition of the image loop.

    rows [0, B) the prompts, [B, 2B) their unconditional twins (only when guided):
        twin = the prompt with every token but BOS and BOI replaced by PAD, same length
        (transformers' JanusForConditionalGeneration.generate, generation_mode="image")
    prefill  embedder(ids) (R, L, H), right-padded, each row its own length ─► decoder
    loop     runtime/image_generate.grid_loop: the decoder's logits are the generation head's,
             CFG on raw logits, each token fed back through the image_embed stage

The twins attend to their PAD tokens, as in transformers (its attention mask is the prompt's,
repeated). Positions start at 0 at each row's first token, which is what transformers' left
padding gives, so ragged prompts in one batch match it row for row.
"""

from __future__ import annotations

import numpy as np

from arx.errors import ArxError
from arx.runtime.image_generate import ImageOptions, ImageResult, Prefix, grid_loop, image_info


def prompt_rows(prompts: list[list[int]], condition: dict, guided: bool):
    """(ids (R, L) int64 right-padded with PAD, lengths (R,)): the prompts, then their twins."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ArxError("give at least one non-empty prompt (--prompt TEXT or --prompt-ids)")
    bos, boi, pad = condition["bos_token_id"], condition["boi_token_id"], condition["pad_token_id"]
    rows = [list(p) for p in prompts]
    if guided:
        rows += [[t if t in (bos, boi) else pad for t in p] for p in prompts]
    lengths = np.array([len(r) for r in rows], np.int64)
    ids = np.full((len(rows), int(lengths.max())), pad, np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lengths


def image_prompt(ids: list[int], condition: dict) -> list[int]:
    """A tokenized prompt as Janus' processor makes it for image mode: BOS first (where the
    tokenizer did not add it) and the image-start token BOI last."""
    bos, boi = condition["bos_token_id"], condition["boi_token_id"]
    ids = list(ids)
    if not ids or ids[0] != bos:
        ids = [bos] + ids
    return ids if ids[-1] == boi else ids + [boi]


def generate_images_from_prompts(session, prompts: list[list[int]],
                                 options: ImageOptions) -> ImageResult:
    """Codebook grids for token-id prompts (one image each, each as transformers feeds it:
    BOS ... BOI) with CFG; `result.classes` holds the prompts."""
    info = image_info(session.manifest)
    if not info.text:
        raise ArxError("this image bundle is class-conditional: give --class N, not a prompt")
    vocab = session.manifest.token_spaces["text"].size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ArxError(f"prompt token {bad[0]} is outside the text vocabulary (0..{vocab - 1})")
    ids, lengths = prompt_rows(prompts, info.condition, options.guided)
    embeds = _embed_text(session, info.condition["embedder"], ids)
    return grid_loop(session, info, Prefix(lengths, embeds=embeds), [list(p) for p in prompts],
                     options)


def _embed_text(session, stage_name: str, ids: np.ndarray) -> np.ndarray:
    """(R, L) prompt ids -> (R, L, H) through the bundle's text embedder stage (the session's
    own embed stage is image_embed, for the token feedback)."""
    from arx.runtime.backend import open_stage

    stage = session.manifest.stages[stage_name]
    with open_stage(session.bundle_dir, session.manifest, stage_name, session.options) as embedder:
        return embedder.run({stage.inputs[0].name: ids})[stage.outputs[0].name]
