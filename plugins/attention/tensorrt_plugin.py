"""TensorRT face of `arx::kv_attention` (tensorrt.plugin, TensorRT 10.x/11.x Python API).

Plugin IO (the ONNX node `arx::kv_attention` has exactly this order):
    inputs   0 q        (B, S_new, Hq, D)     fp32|fp16|bf16, RoPE applied
             1 k_new    (B, S_new, Hkv, D)
             2 v_new    (B, S_new, Hkv, D)
             3 k_cache  (B, Hkv, S_max, D)
             4 v_cache  (B, Hkv, S_max, D)
             5 past_len (B,) int32
             6 new_len  (B,) int32
    outputs  0 out      (B, S_new, Hq, D)     same dtype as q
             1 k_cache  aliased to input 3 (written in place)
             2 v_cache  aliased to input 4 (written in place)
    attributes  mask: str ("causal" | "block"), scale: float (0.0 = 1/sqrt(D))
Tactics: 1 = decode tile (BLOCK_M 16), 2 = prefill tile (BLOCK_M 64); TensorRT times both
per optimization profile.

No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
"""

from typing import Tuple

from .._tensorrt import require_trtp

PLUGIN_ID = "arx::kv_attention"
_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}  # trt.DataType name -> Triton


def _triton_dtype(trt_dtype) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    if name not in _DTYPES:
        raise ValueError(f"arx::kv_attention supports fp32/fp16/bf16, got {trt_dtype}")
    return _DTYPES[name]


def register(aot_target=None) -> None:
    """Register the plugin with tensorrt.plugin once per process."""
    trtp = require_trtp()
    op = getattr(trtp.op, "arx", None)
    if op is not None and hasattr(op, "kv_attention"):
        return
    TD = trtp.TensorDesc

    @trtp.register(PLUGIN_ID)
    def _describe(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                  new_len: TD, mask: str, scale: float) -> Tuple[TD, TD, TD]:
        return q.like(), k_cache.aliased(), v_cache.aliased()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                  new_len: TD, mask: str, scale: float, outputs: Tuple[TD]) -> list:
        f = "FP32|FP16|BF16"
        types = ", ".join([f] * 5 + ["INT32", "INT32"] + [f] * 3)
        return [trtp.AutoTuneCombination(types, "LINEAR", list(_tactics()))]

    @trtp.impl(PLUGIN_ID)
    def _jit(q, k_new, v_new, k_cache, v_cache, past_len, new_len, mask: str, scale: float,
             outputs, stream: int, tactic: int) -> None:
        _launch_jit((q, k_new, v_new, k_cache, v_cache, past_len, new_len), outputs, mask,
                    scale, stream)

    if hasattr(trtp, "aot_impl"):  # TensorRT >= 10.12
        @trtp.aot_impl(PLUGIN_ID)
        def _aot(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                 new_len: TD, mask: str, scale: float, outputs: Tuple[TD], tactic: int):
            return _aot_kernel(trtp, (q, k_new, k_cache), mask, scale, tactic, aot_target)


def _tactics():
    from .triton_kernel import AOT_TACTICS  # imports triton: only when TensorRT asks

    return AOT_TACTICS


def _launch_jit(inputs, outputs, mask, scale, stream) -> None:
    """JIT path: wrap TensorRT's device buffers as torch tensors and launch the Triton kernel."""
    import torch

    from .reference import AttentionOptions
    from .triton_kernel import kv_attention

    q, k_new, v_new, k_cache, v_cache, past_len, new_len = (
        torch.as_tensor(t, device="cuda") for t in inputs)
    out = torch.as_tensor(outputs[0], device="cuda")
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        # outputs[1:] alias k_cache/v_cache: the kernel writes the new tokens into them
        out.copy_(kv_attention(q, k_new, v_new, k_cache, v_cache, past_len, new_len,
                               AttentionOptions(mask=mask, scale=scale)))


def _aot_kernel(trtp, descs, mask, scale, tactic, aot_target):
    """AOT path: (entry name, PTX, launch params, int32 scalars) for tensorrt.plugin."""
    from .. import aot
    from ..tensorrt import current_target
    from .triton_kernel import AOT_TACTICS, AttentionVariant, aot_source

    q, k_new, k_cache = descs
    head_dim = q.shape_expr[3]
    if not head_dim.is_constant:
        raise ValueError("arx::kv_attention needs a static head_dim (last dim of q)")
    variant = AttentionVariant(dtype=_triton_dtype(q.dtype), head_dim=head_dim.constant_value,
                               mask=mask, scale=scale, phase=AOT_TACTICS.get(tactic, "prefill"))
    src = aot_source(variant)
    compiled = aot.compile_source(src, aot_target or current_target(), variant.tag)
    b, s_new, hq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    hkv = k_new.shape_expr[2]
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(s_new * (hq // hkv), src["block_m"])  # see AOT_GRID
    params.grid_y = b * hkv
    params.block_x = compiled.num_warps * 32
    params.shared_mem = compiled.shared_mem
    s_max = k_cache.shape_expr[2]
    extra = trtp.SymIntExprs(4)  # AOT_SCALARS: S_NEW, S_MAX, HQ, HKV
    for i, expr in enumerate((s_new, s_max, hq, hkv)):
        extra[i] = trtp.SymInt32(expr)
    return compiled.entry, compiled.ptx, params, extra

