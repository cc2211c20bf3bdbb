"""Tiny random Janus checkpoints (JanusForConditionalGeneration) for the export and runtime tests.

Weights are drawn wider than transformers' init (std 0.02 makes every image token the same
greedy argmax), so greedy grids vary and a wrong feedback or position shows up in the tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

BOS, EOS, PAD, BOI = 1, 3, 2, 98
TEXT_VOCAB = 640  # holds tests/tokenizer_fixtures.make_llama's 600 ids (BOS <s> = 1, as here)

# two shapes, in benchmarks/bench_image.py's order: (hidden, layers, heads, kv heads,
# intermediate, text vocab, codebook, grid side, VQ base channels, VQ channel multipliers)
SHAPES = {"small": (64, 2, 4, 2, 128, TEXT_VOCAB, 32, 4, 32, [1, 2]),
          "wide": (128, 3, 8, 2, 256, TEXT_VOCAB, 48, 3, 32, [1, 1])}


def tiny_janus(shape: str = "small", seed: int = 0):
    import torch

    model = _bench().janus_model(SHAPES[shape], seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "vision_model" not in name:
                p.normal_(0.0, 0.15 if "vqmodel" not in name else 0.05)
    return model


def _bench():
    """benchmarks/bench_image.py: one Janus config builder for the tests and the benchmark."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        import bench_image
    finally:
        sys.path.remove(folder)
    return bench_image


def save_tiny_janus(folder: Path, shape: str = "small"):
    """The model, saved as a checkpoint folder arx export reads (config.json, safetensors)."""
    model = tiny_janus(shape)
    model.save_pretrained(folder)
    return model


def hf_image_tokens(model, prompts: list[list[int]], cfg_scale: float):
    """transformers' greedy generate(..., generation_mode="image") on left-padded prompts."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False,
                         guidance_scale=cfg_scale)
    return out.numpy()


_EXPORTS: dict[str, tuple[Path, Path]] = {}


def exported_janus(shape: str, root: Path):
    """(checkpoint folder, bundle, model) of a shape, exported once per test session."""
    from arx.export.exporter import ExportOptions, export_model

    folder, bundle = root / f"janus-{shape}", root / f"janus-{shape}.arx"
    if shape not in _EXPORTS:
        save_tiny_janus(folder, shape)
        export_model(source=folder, output=bundle, options=ExportOptions(progress=False))
        _EXPORTS[shape] = folder, bundle
    return (*_EXPORTS[shape], tiny_janus(shape))
