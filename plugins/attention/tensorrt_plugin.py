"""TensorRT JIT face of `arx::kv_attention`: TensorRT's buffers -> the Triton launcher.

The plugin's IO, aliasing, tactics and AOT launch are described once, in plugins/trt_contract.py
(shared with the build kits); this module adds only what needs arx, torch and Triton.

No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
"""

from ..trt_contract import KV_ATTENTION as PLUGIN_ID


def register_jit(trtp) -> None:
    """The JIT implementation (tensorrt.plugin keeps the last one registered)."""

    @trtp.impl(PLUGIN_ID)
    def _jit(q, k_new, v_new, k_cache, v_cache, past_len, new_len, k_scale, v_scale, mask: str,
             scale: float, window: int, outputs, stream: int, tactic: int) -> None:
        _launch_jit((q, k_new, v_new, k_cache, v_cache, past_len, new_len, k_scale, v_scale),
                    outputs, mask, scale, window, stream)


def _launch_jit(inputs, outputs, mask, scale, window, stream) -> None:
    """Wrap TensorRT's device buffers as torch tensors and launch the Triton kernel."""
    import torch

    from .reference import AttentionOptions
    from .triton_kernel import kv_attention

    q, k_new, v_new, k_cache, v_cache, past_len, new_len, k_scale, v_scale = (
        torch.as_tensor(t, device="cuda") for t in inputs)
    out = torch.as_tensor(outputs[0], device="cuda")
    options = AttentionOptions(mask=mask, scale=float(scale), window=int(window))
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        # outputs[1:] alias k_cache/v_cache: the kernel writes the new tokens into them
        out.copy_(kv_attention(q, k_new, v_new, k_cache, v_cache, past_len, new_len, options,
                               k_scale=k_scale, v_scale=v_scale))


def compile_attention(spec: dict, target: str):
    """AOT: compile the PTX variant a trt_contract spec names, for a TARGETS name."""
    from .. import aot
    from .triton_kernel import AttentionVariant, aot_source

    variant = AttentionVariant(dtype=spec["dtype"], head_dim=spec["head_dim"],
                               mask=spec["mask"], phase=spec["phase"], cache=spec.get("cache", ""))
    return aot.compile_source(aot_source(variant), target, variant.tag)
