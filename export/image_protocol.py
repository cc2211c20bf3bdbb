"""The image-token protocol: a class-conditional decoder-protocol module plus its VQ decoder.

A decoder-protocol module (export/protocol.py) is an image-token model when it also has

    arx_image = {"grid": [gh, gw],            # image tokens per image, raster order
                 "num_classes": C,            # class labels 0..C-1
                 "null_class": C,             # the label of the unconditional (CFG) rows
                 "class_token_offset": V,     # class c enters as input id V + c
                 "vq_decoder": "vq",          # attribute: tokens (B, gh*gw) -> pixels (B,3|1,H,W)
                 "pixel_range": [-1.0, 1.0],  # what the VQ decoder's output spans
                 "cfg_scale": 4.0,            # optional: the default guidance scale,
                 "top_k": 0, "temperature": 1.0,  # sampling over the codebook,
                 "codebook": [0, V]}          # and where it lies in the logits: [offset, size]
                                              # (offset > 0: a vocabulary shared with text,
                                              # image token k is id offset + k)

Its logits are over the codebook (vocab_size = codebook size), or over a vocabulary shared with
text of which `codebook` is the image range (the loop samples that range only). The bundle it
exports to:

    decoder      (the protocol decoder, fast in-place path when its attention is plain)
        │  pipeline kind "image-tokens": the loop samples codebook ids (token space "image",
        │  codebook with the grid) and feeds them back as input_ids
        ▼
    vq_decoder   tokens (B, N) int64 ─► pixels (B, C, H, W) float32, fed with "loop.tokens"

and an `image` manifest section: the condition (class ids, the null class, their offset), the
grid, the pixel range and layout, the default guidance, and the VQ decoder's measured error.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Pipeline, PipelineStep, Stage, TensorSpec, TokenSpace

IMAGE_SECTION = "image"
VQ_STAGE, VQ_FILE = "vq_decoder", "vq_decoder.onnx"
IMAGE_SPACE = "image"
REQUIRED = ("grid", "num_classes", "vq_decoder")
VQ_ATOL = 1e-4  # pixels, float32 convs: ORT against PyTorch


def image_spec(module) -> dict | None:
    spec = getattr(module, "arx_image", None)
    return spec if isinstance(spec, dict) else None


def check_image_spec(module, spec: dict) -> dict:
    """The spec with defaults filled in; one-line errors for what a user got wrong."""
    name = type(module).__name__
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise ArxError(f"{name}.arx_image lacks {', '.join(missing)}; see 'Image-token "
                       f"generation' in the README")
    vocab = int(module.arx_decoder["vocab_size"])
    grid = [int(g) for g in spec["grid"]]
    out = {"grid": grid, "num_classes": int(spec["num_classes"]),
           "null_class": int(spec.get("null_class", spec["num_classes"])),
           "class_token_offset": int(spec.get("class_token_offset", vocab)),
           "pixel_range": [float(v) for v in spec.get("pixel_range", (-1.0, 1.0))],
           "cfg_scale": float(spec.get("cfg_scale", 1.0)), "vq_decoder": str(spec["vq_decoder"]),
           "top_k": int(spec.get("top_k", 0)), "temperature": float(spec.get("temperature", 1.0)),
           "codebook": [int(v) for v in spec.get("codebook", (0, vocab))]}
    lo, size = out["codebook"]
    if lo < 0 or size < 1 or lo + size > vocab:
        raise ArxError(f"{name}.arx_image codebook {out['codebook']} is not an [offset, size] "
                       f"range inside the vocabulary (0..{vocab - 1})")
    if len(grid) != 2 or min(grid) < 1 or out["num_classes"] < 1:
        raise ArxError(f"{name}.arx_image needs a grid [rows, cols] >= 1 and num_classes >= 1, "
                       f"got grid {spec['grid']} and {spec['num_classes']} classes")
    if out["class_token_offset"] < vocab:
        raise ArxError(f"{name}.arx_image class_token_offset {out['class_token_offset']} "
                       f"overlaps the codebook (ids 0..{vocab - 1}); class ids start at >= {vocab}")
    if 1 + grid[0] * grid[1] > int(module.arx_decoder["max_seq_len"]):
        raise ArxError(f"{name}.arx_decoder max_seq_len {module.arx_decoder['max_seq_len']} is "
                       f"shorter than the class token + {grid[0] * grid[1]} image tokens")
    if not isinstance(getattr(module, out["vq_decoder"], None), _torch_module()):
        raise ArxError(f"{name}.{out['vq_decoder']} (arx_image['vq_decoder']) is not an "
                       f"nn.Module; give the VQ decoder (tokens -> pixels) as that attribute")
    return out


def _torch_module():
    import torch

    return torch.nn.Module


@contextlib.contextmanager
def _without(module, attr: str):
    """The decoder traced without its VQ decoder: its weights stay out of decoder.onnx."""
    sub = module._modules.pop(attr)
    try:
        yield sub
    finally:
        module._modules[attr] = sub


def export_image_decoder(src, bundle: Path, options):
    """DecoderExport of the decoder stage plus the vq_decoder stage, token spaces, pipeline."""
    import dataclasses

    from arx.export.protocol import export_protocol_decoder

    spec = check_image_spec(src.module, image_spec(src.module))
    with _without(src.module, spec["vq_decoder"]) as vq:
        decoder = export_protocol_decoder(src, bundle, options)
    lo, codebook = spec["codebook"]
    stage, vq_error = export_vq_stage(vq.eval(), bundle, spec, codebook)
    n = spec["grid"][0] * spec["grid"][1]
    pipeline = Pipeline(kind="image-tokens", token_space=IMAGE_SPACE,
                        then=(PipelineStep(VQ_STAGE, {"tokens": "loop.tokens"}),))
    channels, height, width = stage.outputs[0].shape[1:]
    section = {"condition": {"kind": "class", "num_classes": spec["num_classes"],
                             "null_class": spec["null_class"],
                             "class_token_offset": spec["class_token_offset"], "prefix_len": 1},
               "grid": spec["grid"], "tokens_per_image": n, "cfg_scale": spec["cfg_scale"],
               "top_k": spec["top_k"], "temperature": spec["temperature"],
               "pixels": {"stage": VQ_STAGE, "layout": "NCHW", "range": spec["pixel_range"],
                          "channels": channels, "height": height, "width": width},
               "vq_parity": vq_error, "codebook": {"offset": lo, "size": codebook}}
    decoder.model_info["image"] = {"vq_parameters": int(sum(p.numel() for p in vq.parameters()))}
    return dataclasses.replace(
        decoder, plain_stages={**decoder.plain_stages, VQ_STAGE: stage}, pipeline=pipeline,
        token_spaces={IMAGE_SPACE: TokenSpace("codebook", codebook, tuple(spec["grid"]))},
        extensions={**decoder.extensions, IMAGE_SECTION: section})


def export_vq_stage(vq, bundle: Path, spec: dict, codebook: int) -> tuple[Stage, dict]:
    """vq_decoder.onnx with a dynamic batch, checked against the module on random grids."""
    import torch

    from arx.export.graph import save_with_external_data
    from arx.export.torch_output import error_summary, quiet_torch

    n = spec["grid"][0] * spec["grid"][1]
    example = torch.randint(0, codebook, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vq(example)
    if ref.dim() != 4 or ref.shape[1] not in (1, 3):
        raise ArxError(f"the VQ decoder returns {tuple(ref.shape)}; it must return pixels "
                       f"(B, 1 or 3, H, W) for tokens (B, {n})")
    with warnings.catch_warnings(), quiet_torch():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                vq, (example,), dynamo=True, input_names=["tokens"], output_names=["pixels"],
                dynamic_shapes=({0: torch.export.Dim("batch_size")},), opset_version=21,
                verbose=False)
        except Exception as e:  # torch.export raises many kinds of errors for untraceable code
            raise ArxError(f"could not trace the VQ decoder {type(vq).__name__} to ONNX "
                           f"({error_summary(e)}); keep its forward free of data-dependent "
                           f"control flow") from e
    model = program.model_proto
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13
    save_with_external_data(model, bundle / VQ_FILE, VQ_FILE + ".data")
    _, c, h, w = (int(d) for d in ref.shape)
    stage = Stage(VQ_FILE, (TensorSpec("tokens", "int64", ("batch_size", n)),),
                  (TensorSpec("pixels", "float32", ("batch_size", c, h, w)),),
                  token_space=IMAGE_SPACE)
    return stage, _vq_parity(bundle / VQ_FILE, vq, codebook, n)


def _vq_parity(path: Path, vq, codebook: int, n: int) -> dict:
    """Max abs error of the ORT stage against the module on 3 random grids; refuses over VQ_ATOL."""
    import torch

    from arx.runtime.backend import OrtBackend

    tokens = np.random.default_rng(1).integers(0, codebook, (3, n)).astype(np.int64)
    with torch.no_grad():
        ref = vq(torch.from_numpy(tokens)).numpy()
    with OrtBackend(path) as backend:
        got = backend.run({"tokens": tokens})["pixels"]
    err = float(np.abs(got - ref).max())
    if not err <= VQ_ATOL:
        raise ArxError(f"the exported VQ decoder differs from PyTorch by {err:.2e} (> {VQ_ATOL}) "
                       f"on random token grids; nothing was written")
    return {"max_abs_err": err, "atol": VQ_ATOL, "inputs": "3 random grids"}
