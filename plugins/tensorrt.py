"""Register every arx TensorRT plugin: `register_plugins()` (a call, never an import effect)."""

from __future__ import annotations

PLUGIN_IDS = ("arx::kv_attention", "arx::sample")


def register_plugins(aot_target: str | None = None) -> tuple[str, ...]:
    """Register `arx::kv_attention` and `arx::sample` with tensorrt.plugin (idempotent).

    aot_target: a name of arx.plugins.aot.TARGETS for the AOT PTX; None = the SM of the GPU
    that builds the engine. Needs TensorRT's libraries (`pip install 'arx[gpu]'`).
    """
    from .attention.tensorrt_plugin import register as register_attention
    from .sampling.tensorrt_plugin import register as register_sample

    register_attention(aot_target)
    register_sample(aot_target)
    return PLUGIN_IDS


def current_target() -> str:
    """TARGETS name of the local GPU (for AOT compilation while building on the device)."""
    from ._triton import require_triton
    from .aot import TARGETS

    triton = require_triton()
    arch = triton.runtime.driver.active.get_current_target().arch
    for name, t in TARGETS.items():
        if t.arch == arch:
            return name
    raise ValueError(f"GPU sm_{arch} is not an arx target; known: {', '.join(TARGETS)}")
