"""TensorRT JIT face of `arx::sample`: TensorRT's buffers -> the Triton launcher.

The plugin's IO, tactics and AOT launch are described once, in plugins/trt_contract.py (shared
with the build kits); this module adds only what needs arx, torch and Triton.

No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
"""

from ..trt_contract import SAMPLE as PLUGIN_ID


def register_jit(trtp) -> None:
    """The JIT implementation (tensorrt.plugin keeps the last one registered)."""

    @trtp.impl(PLUGIN_ID)
    def _jit(logits, params, presence, seed, offset, row, guidance: int, outputs,
             stream: int) -> None:
        import torch

        from .triton_kernel import sample

        t = [torch.as_tensor(x, device="cuda")
             for x in (logits, params, presence, seed, offset, row)]
        ids = torch.as_tensor(outputs[0], device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ids.copy_(sample(*t))


def compile_sample(spec: dict, target: str):
    """AOT: compile the PTX variant a trt_contract spec names, for a TARGETS name."""
    from .. import aot
    from ..trt_contract import sample_tag
    from .triton_kernel import aot_source

    tag = sample_tag(spec["dtype"], spec["guidance"])
    return aot.compile_source(aot_source(spec["dtype"], spec["guidance"]), target, tag)
