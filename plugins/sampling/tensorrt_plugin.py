"""TensorRT face of `arx::sample` (tensorrt.plugin, TensorRT 10.x/11.x Python API).

Plugin IO (the ONNX node `arx::sample` has exactly this order):
    inputs   0 logits   (R, V) fp32|fp16|bf16, R = B, or 2B when guidance=1 ([cond; uncond])
             1 params   (B, 5) float32: temperature, top_k, top_p, repetition_penalty, cfg_scale
             2 presence (B, V) bool
             3 seed     (B,) int64
             4 offset   (B,) int64
    outputs  0 ids      (B,) int32
    attributes  guidance: int (0 | 1)

No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
"""

from typing import Tuple

from .._tensorrt import require_tensorrt, require_trtp

PLUGIN_ID = "arx::sample"


def register(aot_target=None) -> None:
    """Register the plugin with tensorrt.plugin once per process."""
    trtp = require_trtp()
    trt = require_tensorrt()
    op = getattr(trtp.op, "arx", None)
    if op is not None and hasattr(op, "sample"):
        return
    TD = trtp.TensorDesc

    @trtp.register(PLUGIN_ID)
    def _describe(logits: TD, params: TD, presence: TD, seed: TD, offset: TD,
                  guidance: int) -> Tuple[TD]:
        return (trtp.from_shape_expr((params.shape_expr[0],), dtype=trt.int32),)

    @trtp.autotune(PLUGIN_ID)
    def _autotune(logits: TD, params: TD, presence: TD, seed: TD, offset: TD, guidance: int,
                  outputs: Tuple[TD]) -> list:
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32, BOOL, INT64, INT64, INT32",
                                         "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def _jit(logits, params, presence, seed, offset, guidance: int, outputs,
             stream: int) -> None:
        import torch

        from .triton_kernel import sample

        t = [torch.as_tensor(x, device="cuda") for x in (logits, params, presence, seed, offset)]
        ids = torch.as_tensor(outputs[0], device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ids.copy_(sample(*t))

    if hasattr(trtp, "aot_impl"):  # TensorRT >= 10.12
        @trtp.aot_impl(PLUGIN_ID)
        def _aot(logits: TD, params: TD, presence: TD, seed: TD, offset: TD, guidance: int,
                 outputs: Tuple[TD], tactic: int):
            return _aot_kernel(trtp, logits, params, guidance, aot_target)


_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}


def _aot_kernel(trtp, logits, params, guidance, aot_target):
    from .. import aot
    from ..tensorrt import current_target
    from .triton_kernel import aot_source

    dtype = _DTYPES[getattr(logits.dtype, "name", str(logits.dtype)).split(".")[-1].upper()]
    src = aot_source(dtype, bool(guidance))
    tag = f"sample_{dtype}" + ("_cfg" if guidance else "")
    compiled = aot.compile_source(src, aot_target or current_target(), tag)
    b, v = params.shape_expr[0], logits.shape_expr[1]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = b  # AOT_GRID: one program per row
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared_mem
    extra = trtp.SymIntExprs(2)  # AOT_SCALARS: B, V
    extra[0], extra[1] = trtp.SymInt32(b), trtp.SymInt32(v)
    return compiled.entry, compiled.ptx, launch, extra
