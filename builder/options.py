"""Options of `arx build` (a frozen dataclass; the CLI maps flags onto it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from arx.errors import ArxError

from .targets import Target, get_target

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# which logits the engine returns beside the token ids; "verify": none, but every position's
# greedy token (ArgMax on the device), all a greedy speculative verify step needs
LOGITS_MODES = ("last", "all", "none", "verify")
PLUGIN_IMPLS = ("aot", "jit")  # AOT: PTX inside the engine; JIT: Triton at engine run time
# Attention in the TensorRT form: the arx::kv_attention plugin, or standard ONNX ops TensorRT
# builds natively (Attention + TensorScatter: IAttention + IKVCacheUpdateLayer).
ATTENTION_IMPLS = ("plugin", "native")
# What turns the last logits into token ids inside the engine: the arx::sample plugin (greedy,
# temperature, top-k/p, repetition penalty, seeds), a native ArgMax (greedy), or nothing.
SAMPLERS = ("plugin", "argmax", "none")


@dataclass(frozen=True)
class BuildOptions:
    target: str
    precision: str = "fp16"
    max_batch: int | None = None  # None: the target table's default
    max_seq_len: int | None = None  # static cache length S_max; None: the bundle's
    opt_batch: int | None = None  # None: max_batch // 2 (at least 1)
    opt_prompt_len: int | None = None  # prefill profile opt; None: S_max // 4 (at least 1)
    decode_tokens: int = 1  # new tokens per decode step (> 1: speculative verification)
    kit: bool = False  # write a build kit instead of (or when TensorRT is absent) an engine
    output: Path | None = None  # kit folder; None: <bundle>/kits/<target>/
    portable: bool = False  # version-compatible + hardware-compatible engine
    attention: str = "plugin"  # ATTENTION_IMPLS
    sampler: str = "plugin"  # SAMPLERS
    logits: str = "last"
    plugin_impl: str = "aot"
    ptx: bool = True  # compile the plugin PTX into the kit (needs triton)
    timing_cache: Path | None = None  # None: <bundle>/engines/<target>/timing.cache
    workspace_gb: float | None = None  # builder workspace limit; None: TensorRT's default
    overwrite: bool = False
    force: bool = False  # keep an engine whose check against ONNX Runtime failed
    progress: bool = True
    kv_dtype: str | None = None  # fp16 | int8; None: the bundle's --kv-dtype, else the precision's

    def __post_init__(self):
        get_target(self.target)  # unknown targets fail here, listing the known ones
        if self.precision not in PRECISIONS:
            raise ArxError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.logits not in LOGITS_MODES:
            raise ArxError(f"--logits must be one of {', '.join(LOGITS_MODES)}")
        if self.plugin_impl not in PLUGIN_IMPLS:
            raise ArxError(f"--plugin-impl must be one of {', '.join(PLUGIN_IMPLS)}")
        for name in ("max_batch", "max_seq_len", "opt_batch", "opt_prompt_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ArxError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
        if self.decode_tokens < 1:
            raise ArxError(f"--decode-tokens must be >= 1 (got {self.decode_tokens})")
        if self.attention not in ATTENTION_IMPLS:
            raise ArxError(f"--attention must be one of {', '.join(ATTENTION_IMPLS)}")
        if self.sampler not in SAMPLERS:
            raise ArxError(f"--sampler must be one of {', '.join(SAMPLERS)}")
        if self.sampler == "none" and self.logits in ("none", "verify"):
            raise ArxError(f"an engine without the sampler must return logits; drop --logits "
                           f"{self.logits} or keep the sampler")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ArxError("--workspace-gb must be > 0")

    @property
    def target_info(self) -> Target:
        return get_target(self.target)

    def batch(self) -> int:
        return self.max_batch or self.target_info.max_batch
