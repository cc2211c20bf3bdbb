"""The plain stages of a next-scale bundle (export/var_protocol.py) and its parity check.

    var_class          class_ids (B,) int64 ─ module.class_emb ─► cond (B, D)
    var_next_input_k   tokens (B, n_k) int64, f_hat (B, Cvae, hw, hw)
                         ─ codebook lookup (B, Cvae, pn_k, pn_k) ─ get_next_autoregressive_input(k)
                         ─► f_hat_out (B, Cvae, hw, hw), next_input (B, n_k+1, Cvae) (not the last)
    vq_decoder         f_hat (B, Cvae, hw, hw) ─ vae.fhat_to_img ─► pixels (B, C, H, W)

Each is traced with a dynamic batch only: a scale's sizes are fixed by the schedule.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Stage, TensorSpec

STAGE_ATOL = 1e-4  # float32 convs and resampling: ORT against PyTorch
B = "batch_size"


def _next_input_module(vae, k: int, n_scales: int):
    import torch

    class NextInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, tokens, f_hat):
            b, n = tokens.shape
            pn = int(round(n ** 0.5))
            h = self.vae.quantize.embedding(tokens).transpose(1, 2).reshape(b, -1, pn, pn)
            f_hat, nxt = self.vae.quantize.get_next_autoregressive_input(k, n_scales, f_hat, h)
            if k == n_scales - 1:
                return f_hat
            return f_hat, nxt.flatten(2).transpose(1, 2)  # (B, n_k+1, Cvae)

    return NextInput()


def _call(owner, method: str):
    """owner.method(x) as a module's forward (owner registered: its weights are parameters)."""
    import torch

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.owner = owner

        def forward(self, x):
            return getattr(self.owner, method)(x)

    return Call()


def _trace(module, example: tuple, names: tuple[list[str], list[str]], path: Path, what: str):
    """torch.onnx (dynamo) with every input's dim 0 the batch; weights beside the graph."""
    import torch

    from arx.export.graph import save_with_external_data
    from arx.export.torch_output import error_summary, quiet_torch

    batch = torch.export.Dim("batch_size")
    with warnings.catch_warnings(), quiet_torch():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, example, dynamo=True, input_names=names[0], output_names=names[1],
                dynamic_shapes=tuple({0: batch} for _ in example), opset_version=21,
                verbose=False)
        except Exception as e:  # torch.export raises many kinds of errors for untraceable code
            raise ArxError(f"could not trace {what} to ONNX ({error_summary(e)}); keep it free "
                           f"of data-dependent control flow") from e
    model = program.model_proto
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13
    del model.graph.value_info[:]
    save_with_external_data(model, path, path.name + ".data")


def _spec(name: str, t) -> TensorSpec:
    dtype = "float32" if t.dtype.is_floating_point else "int64"  # ids or features/pixels
    return TensorSpec(name, dtype, (B, *[int(d) for d in t.shape[1:]]))


def _stage(module, example, names, bundle: Path, file: str, what: str) -> Stage:
    import torch

    with torch.no_grad():
        out = module(*example)
    outs = out if isinstance(out, tuple) else (out,)
    _trace(module, example, names, bundle / file, what)
    return Stage(file, tuple(_spec(n, t) for n, t in zip(names[0], example)),
                 tuple(_spec(n, t) for n, t in zip(names[1], outs)))


def export_stages(module, vae, spec: dict, bundle: Path) -> dict[str, Stage]:
    """var_class, var_next_input_k for every scale and vq_decoder, traced from the module."""
    import torch

    from arx.export.var_protocol import CLASS_STAGE, VQ_STAGE, next_stage

    pns, hw = spec["patch_nums"], spec["patch_nums"][-1]
    cvae = int(vae.quantize.embedding.weight.shape[1])
    gen = torch.Generator().manual_seed(0)
    f_hat = torch.randn(2, cvae, hw, hw, generator=gen)
    stages = {CLASS_STAGE: _stage(_call(module.class_emb, "forward"), (torch.tensor([0, 1]),),
                                  (["class_ids"], ["cond"]), bundle, "var_class.onnx",
                                  "class_emb")}
    for k, pn in enumerate(pns):
        tokens = torch.randint(0, vae.quantize.embedding.num_embeddings, (2, pn * pn), generator=gen)
        outs = ["f_hat_out"] if k == len(pns) - 1 else ["f_hat_out", "next_input"]
        stages[next_stage(k)] = _stage(_next_input_module(vae, k, len(pns)), (tokens, f_hat),
                                       (["tokens", "f_hat"], outs), bundle,
                                       f"{next_stage(k)}.onnx",
                                       f"get_next_autoregressive_input at scale {k}")
    pixels = _stage(_call(vae, "fhat_to_img"), (f_hat,), (["f_hat"], ["pixels"]), bundle,
                    "vq_decoder.onnx", "vae.fhat_to_img")
    if len(pixels.outputs[0].shape) != 4 or pixels.outputs[0].shape[1] not in (1, 3):
        raise ArxError(f"vae.fhat_to_img returns {pixels.outputs[0].shape}; it must return "
                       f"pixels (B, 1 or 3, H, W)")
    stages[VQ_STAGE] = pixels
    return stages
