"""Standalone AOT registrations of `arx::kv_attention` and `arx::sample` for a build kit.

Copied verbatim into every kit beside build_engine.py; imports only tensorrt (no arx, no
Triton): the kernels are the PTX files in the kit's plugins/ folder, compiled ahead of time for
the kit's SM by arx.plugins.aot, each with a JSON of its launch parameters (entry, block,
shared memory, constexprs, grid formula). The shapes, aliasing and tactics mirror
plugins/attention/tensorrt_plugin.py and plugins/sampling/tensorrt_plugin.py (the contracts in
docs/plugins.md); a kit-local copy exists because those import arx and Triton.

No `from __future__ import annotations`: tensorrt.plugin reads the annotations as objects.
"""

import glob
import json
import os
from typing import Tuple

_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}  # trt.DataType name -> PTX tag
_TACTICS = {1: "decode", 2: "prefill"}  # arx::kv_attention tactic id -> tile phase


def _imports():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        import tensorrt_bindings as trt
        import tensorrt_bindings.plugin as trtp
    return trt, trtp


def _tag(desc) -> str:
    name = getattr(desc.dtype, "name", str(desc.dtype)).split(".")[-1].upper()
    if name not in _DTYPES:
        raise ValueError(f"arx plugins support fp32/fp16/bf16, got {desc.dtype}")
    return _DTYPES[name]


def load_variants(folder: str) -> dict:
    """tag -> (ptx text, launch json) for every <tag>.<sm>.ptx in `folder`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.ptx"))):
        tag = os.path.basename(path).split(".")[0]
        with open(path, encoding="utf-8") as f:
            ptx = f.read()
        with open(path[:-4] + ".json", encoding="utf-8") as f:
            out[tag] = (ptx, json.load(f))
    if not out:
        raise FileNotFoundError(f"no plugin PTX in {folder}; rebuild the kit with PTX")
    return out


def _variant(variants: dict, tag: str):
    if tag not in variants:
        raise KeyError(f"the kit has no PTX for {tag}; it has {sorted(variants)}")
    return variants[tag]


def register(folder: str) -> None:
    """Register both plugins with their AOT implementation from the PTX in `folder`."""
    trt, trtp = _imports()
    variants = load_variants(folder)
    op = getattr(trtp.op, "arx", None)
    if op is None or not hasattr(op, "kv_attention"):
        _register_attention(trtp, variants)
    if op is None or not hasattr(op, "sample"):
        _register_sample(trt, trtp, variants)


def _register_attention(trtp, variants) -> None:
    TD = trtp.TensorDesc

    @trtp.register("arx::kv_attention")
    def _describe(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                  new_len: TD, mask: str, scale: float) -> Tuple[TD, TD, TD]:
        return q.like(), k_cache.aliased(), v_cache.aliased()

    @trtp.autotune("arx::kv_attention")
    def _autotune(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                  new_len: TD, mask: str, scale: float, outputs: Tuple[TD]) -> list:
        f = "FP32|FP16|BF16"
        types = ", ".join([f] * 5 + ["INT32", "INT32"] + [f] * 3)
        return [trtp.AutoTuneCombination(types, "LINEAR", list(_TACTICS))]

    @trtp.aot_impl("arx::kv_attention")
    def _aot(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
             new_len: TD, mask: str, scale: float, outputs: Tuple[TD], tactic: int):
        d = q.shape_expr[3]
        tag = f"kv_attention_{_tag(q)}_d{d.constant_value}_{mask}_{_TACTICS.get(tactic, 'prefill')}"
        ptx, meta = _variant(variants, tag)
        b, s_new, hq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        hkv = k_new.shape_expr[2]
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(s_new * (hq // hkv), meta["constexprs"]["BLOCK_M"])
        params.grid_y = b * hkv
        params.block_x = meta["block"][0]
        params.shared_mem = meta["shared_mem"]
        extra = trtp.SymIntExprs(4)  # scalars in the kernel's order: S_NEW, S_MAX, HQ, HKV
        for i, expr in enumerate((s_new, k_cache.shape_expr[2], hq, hkv)):
            extra[i] = trtp.SymInt32(expr)
        return meta["entry"], ptx, params, extra


def _register_sample(trt, trtp, variants) -> None:
    TD = trtp.TensorDesc

    @trtp.register("arx::sample")
    def _describe(logits: TD, params: TD, presence: TD, seed: TD, offset: TD,
                  guidance: int) -> Tuple[TD]:
        return (trtp.from_shape_expr((params.shape_expr[0],), dtype=trt.int32),)

    @trtp.autotune("arx::sample")
    def _autotune(logits: TD, params: TD, presence: TD, seed: TD, offset: TD, guidance: int,
                  outputs: Tuple[TD]) -> list:
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32, BOOL, INT64, INT64, INT32",
                                         "LINEAR")]

    @trtp.aot_impl("arx::sample")
    def _aot(logits: TD, params: TD, presence: TD, seed: TD, offset: TD, guidance: int,
             outputs: Tuple[TD], tactic: int):
        tag = f"sample_{_tag(logits)}" + ("_cfg" if guidance else "")
        ptx, meta = _variant(variants, tag)
        b, v = params.shape_expr[0], logits.shape_expr[1]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = b  # one program per row
        launch.block_x = meta["block"][0]
        launch.shared_mem = meta["shared_mem"]
        extra = trtp.SymIntExprs(2)  # scalars: B, V
        extra[0], extra[1] = trtp.SymInt32(b), trtp.SymInt32(v)
        return meta["entry"], ptx, launch, extra
