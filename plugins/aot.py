"""Ahead-of-time PTX for the arx kernels, compiled on a machine without a GPU.

`triton.compile` with an explicit `GPUTarget` needs no driver: Triton's bundled LLVM emits the
PTX and its bundled `ptxas` assembles it (which also proves the PTX valid for that SM). Each
variant is written as `<tag>.<target>.ptx` plus a JSON with what a launcher needs.

Triton appends two pointer parameters to every kernel (global and profile scratch).
tensorrt.plugin's AOT launch passes only inputs, int32 scalars and outputs, so when a kernel uses
no scratch (size 0, checked) the two trailing parameters are removed from the PTX entry.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ._triton import require_triton


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability as Triton's GPUTarget wants it (90 -> sm_90a, 110 -> sm_110a)
    sm: str  # the `.target` line of the PTX
    devices: str


# Target table (data): name -> SM. Triton adds the "a" (arch-specific) suffix from 90 upward.
TARGETS = {
    "sm_80": Target(80, "sm_80", "A100, A30"),
    "sm_87": Target(87, "sm_87", "Jetson AGX Orin / Orin NX / Orin Nano"),
    "sm_89": Target(89, "sm_89", "L4, L40S, RTX 40xx"),
    "sm_90a": Target(90, "sm_90a", "H100, H200, GH200"),
    "sm_110a": Target(110, "sm_110a", "Jetson Thor"),
}


@dataclass(frozen=True)
class CompiledVariant:
    tag: str
    target: str
    entry: str
    ptx: str
    num_warps: int
    shared_mem: int
    meta: dict

    def launch_json(self) -> dict:
        return {"entry": self.entry, "target": self.target, "block": [self.num_warps * 32, 1, 1],
                "shared_mem": self.shared_mem, **self.meta}


def strip_scratch_params(ptx: str, entry: str, n_params: int) -> str:
    """Drop the entry parameters after the first n_params, refusing if the body uses them."""
    head = re.search(r"\.visible \.entry " + re.escape(entry) + r"\((.*?)\)", ptx, re.S)
    if head is None:
        raise ValueError(f"entry {entry} not found in the PTX")
    params = [p.strip() for p in head.group(1).split(",") if p.strip()]
    extra = params[n_params:]
    for p in extra:
        name = p.split()[-1]
        if f"[{name}]" in ptx:
            raise ValueError(f"kernel {entry} reads {name}: it needs scratch memory, which the "
                             "TensorRT AOT launch cannot pass")
    kept = ",\n\t".join(params[:n_params])
    return ptx[:head.start(1)] + "\n\t" + kept + "\n" + ptx[head.end(1):]


def compile_source(src: dict, target: str, tag: str) -> CompiledVariant:
    """Compile one `aot_source(...)` dict for a TARGETS name."""
    triton = require_triton()
    from triton.backends.compiler import GPUTarget

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    if not hasattr(src["fn"], "cache_key"):  # an InterpretedFunction: TRITON_INTERPRET=1
        raise ValueError("AOT compilation needs real Triton kernels: unset TRITON_INTERPRET "
                         "(or run scripts/compile_ptx.py in its own process)")
    t = TARGETS[target]
    ast = triton.compiler.ASTSource(fn=src["fn"], signature=src["signature"],
                                    constexprs=src["constexprs"])
    kernel = triton.compile(ast, target=GPUTarget("cuda", t.arch, 32), options=src["options"])
    md = kernel.metadata
    if md.global_scratch_size or md.profile_scratch_size:
        raise ValueError(f"{tag} needs scratch memory; the TensorRT AOT launch cannot pass it")
    ptx = strip_scratch_params(kernel.asm["ptx"], md.name, len(src["signature"]))
    meta = {"kernel": tag, "signature": src["signature"],
            "constexprs": {k: v for k, v in src["constexprs"].items()},
            "scalars": list(src["scalars"]), "grid": list(src["grid"]),
            "num_warps": md.num_warps, "triton": triton.__version__}
    return CompiledVariant(tag, target, md.name, ptx, md.num_warps, md.shared, meta)


def ptx_target_line(ptx: str) -> str | None:
    m = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    return m.group(1).rstrip(",") if m else None


def write_variant(compiled: CompiledVariant, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{compiled.tag}.{compiled.target}"
    ptx_path, json_path = out_dir / f"{stem}.ptx", out_dir / f"{stem}.json"
    ptx_path.write_text(compiled.ptx)
    json_path.write_text(json.dumps(compiled.launch_json(), indent=2, sort_keys=True) + "\n")
    return ptx_path, json_path


def default_variants() -> list[tuple[str, dict]]:
    """The small shipped set: attention fp16/bf16 x cache (their own, int8) x D {64, 128} x
    mask x tile phase, and the sampler for fp32/fp16/bf16 logits with and without guidance.
    Other cache pairs (an fp16 cache in fp32/bf16 engines) compile as a kit needs them."""
    from .attention.triton_kernel import AttentionVariant
    from .attention.triton_kernel import aot_source as attention_source
    from .sampling.triton_kernel import aot_source as sample_source
    from .trt_contract import sample_tag

    out = []
    for dtype, cache in itertools.product(("fp16", "bf16"), ("", "int8")):
        for d, mask, phase in itertools.product((64, 128), ("causal", "block"),
                                                ("decode", "prefill")):
            v = AttentionVariant(dtype=dtype, head_dim=d, mask=mask, phase=phase, cache=cache)
            out.append((v.tag, attention_source(v)))
    for dtype in ("fp32", "fp16", "bf16"):
        for guidance in (False, True):
            out.append((sample_tag(dtype, guidance), sample_source(dtype, guidance)))
    return out


def compile_all(out_dir: Path, targets=tuple(TARGETS), variants=None, log=print) -> list[Path]:
    """Compile every variant for every target into out_dir; return the written paths."""
    written = []
    for tag, src in variants if variants is not None else default_variants():
        for target in targets:
            compiled = compile_source(src, target, tag)
            written.extend(write_variant(compiled, Path(out_dir)))
            log(f"{tag:<40} {target:<8} shared={compiled.shared_mem:<6} entry={compiled.entry}")
    return written
