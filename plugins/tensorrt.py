"""Register every arx TensorRT plugin: `register_plugins()` (a call, never an import effect).

    trt_contract.register_descriptors   IO, aliasing, tactics (the same code the kits run)
    <op>/tensorrt_plugin.register_jit   JIT: launch the Triton kernel on TensorRT's buffers
    trt_contract.register_aot           AOT: PTX compiled here by Triton, on first use
"""

from __future__ import annotations

from .trt_contract import KV_ATTENTION, SAMPLE

PLUGIN_IDS = (KV_ATTENTION, SAMPLE)


def register_plugins(aot_target: str | None = None) -> tuple[str, ...]:
    """Register `arx::kv_attention` and `arx::sample` with tensorrt.plugin (idempotent).

    aot_target: a name of arx.plugins.aot.TARGETS for the AOT PTX; None = the SM of the GPU
    that builds the engine. Needs TensorRT's libraries (`pip install 'arx[gpu]'`).
    """
    from . import trt_contract
    from ._tensorrt import require_tensorrt, require_trtp
    from .attention.tensorrt_plugin import register_jit as attention_jit
    from .sampling.tensorrt_plugin import register_jit as sample_jit

    trt, trtp = require_tensorrt(), require_trtp()
    trt_contract.register_descriptors(trt, trtp)
    attention_jit(trtp)
    sample_jit(trtp)
    if hasattr(trtp, "aot_impl"):  # TensorRT >= 10.12
        trt_contract.register_aot(trtp, compiling_kernels(aot_target))
    return PLUGIN_IDS


def compiling_kernels(aot_target: str | None = None):
    """A trt_contract KernelSource that compiles each requested variant with Triton (cached
    per tag: TensorRT asks once per tactic and profile)."""
    from .attention.tensorrt_plugin import compile_attention
    from .sampling.tensorrt_plugin import compile_sample

    cache: dict = {}

    def kernel(tag: str, spec: dict):
        if tag not in cache:
            compile_op = compile_attention if spec["op"] == "kv_attention" else compile_sample
            compiled = compile_op(spec, aot_target or current_target())
            cache[tag] = (compiled.entry, compiled.ptx, compiled.launch_json())
        return cache[tag]

    return kernel


def current_target() -> str:
    """TARGETS name of the local GPU (for AOT compilation while building on the device)."""
    from ._triton import require_triton
    from .aot import TARGETS

    triton = require_triton()
    arch = triton.runtime.driver.active.get_current_target().arch
    for name, t in TARGETS.items():
        if t.arch == arch:
            return name
    from arx.errors import ArxError

    raise ArxError(f"GPU sm_{arch} is not an arx target; known: {', '.join(TARGETS)}; build a "
                   f"kit for one of them with: arx build BUNDLE --target NAME --kit")
