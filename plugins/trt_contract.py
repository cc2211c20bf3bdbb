"""The TensorRT contract of the arx plugins: one module, used by arx and copied into every kit.

`arx::kv_attention` and `arx::sample` as `tensorrt.plugin` sees them: IO shapes, dtypes,
aliasing, tactics, PTX variant tags, launch geometry and scalar arguments of the AOT kernels.
This file imports only the standard library (and `tensorrt` inside functions), never arx or
Triton, because build kits carry a byte-identical copy as `kit_plugins.py` (tests check both).

    arx (plugins/tensorrt.py)                         a kit (kit_plugins.py = this file)
    register_descriptors  ◄── shapes, aliasing ──►   register_descriptors
    JIT impl: Triton launch (attention/sampling
              tensorrt_plugin.py)
    register_aot(compiling_kernels(sm))               register_aot(folder_kernels(plugins/))
                  └── AOT impl here: tag ─► (entry, PTX, launch JSON) ─► grid, scalars ──┘

Plugin IO (the ONNX nodes of builder/schemas.py have exactly this order; docs/plugins.md):
  arx::kv_attention
    inputs   0 q (B, S_new, Hq, D)  1 k_new (B, S_new, Hkv, D)  2 v_new (B, S_new, Hkv, D)
             3 k_cache (B, Hkv, S_max, D)  4 v_cache  5 past_len (B,) int32  6 new_len (B,) int32
             7 k_scale (Hkv, 1, D) fp32  8 v_scale (Hkv, 1, D) fp32 (read for an int8 cache only)
    outputs  0 out (B, S_new, Hq, D)  1 k_cache (aliased to input 3)  2 v_cache (aliased to 4)
    attributes  mask: str, scale: float (0.0 = 1/sqrt(D)), window: int (0 = none)
    dtypes   q/k_new/v_new/out one of fp32|fp16|bf16; the caches q's dtype, fp16 or int8
             (CACHE_COMBOS); an int8 cache is quantized per channel with k_scale/v_scale
  arx::sample
    inputs   0 logits (R, V), R = B or 2B  1 params (B, 5) f32  2 presence (B, V) bool
             3 seed (B,) int64  4 offset (B,) int64  5 row (B,) int64 (Philox row term)
    outputs  0 ids (B,) int32
    attributes  guidance: int (0 | 1)

The sampler's `row` is the last word of its Philox counter, an input rather than the program
id, so the caller chooses what a row's draws depend on: arange(B) (distinct rows of one seed),
or zeros for loops that draw each row as the host draws it alone (image i with seed + i).

The int8 cache scales are plugin inputs, not attributes: TensorRT's AOT launch passes a kernel
only input/output pointers and int32 scalars, so an attribute array could reach a PTX only
compiled into it (one PTX per model and layer), while an input is a device buffer TensorRT keeps
with the weights (an initializer) and one PTX serves every model of a head dim. tensorrt.plugin
has no optional inputs, so a float cache gets them too (a (1,) fp32 the kernel never reads).

Scale and window are runtime scalars of the attention kernel, not compiled in: one PTX serves
every scale and window. TensorRT's AOT launch passes only int32 scalars, so the scale travels
as the bit pattern of the fp32 value `scale * log2(e)` (the kernel's softmax is in base 2) and
the kernel bitcasts it back.

No `from __future__ import annotations`: tensorrt.plugin reads the annotations as objects.
"""

import glob
import json
import math
import os
import struct
from typing import Callable, Tuple

KV_ATTENTION = "arx::kv_attention"
SAMPLE = "arx::sample"
DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}  # trt.DataType name -> PTX dtype
CACHE_DTYPES = {**DTYPES, "INT8": "int8"}
# (activation dtype, cache dtype) pairs kv_attention takes: the precision's own cache, an fp16
# cache in an fp32/bf16 engine, an int8 cache in any (no fp32 cache under fp16: it saves nothing)
CACHE_COMBOS = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16"),
                ("bf16", "fp16"), ("fp32", "int8"), ("fp16", "int8"), ("bf16", "int8"))
_TRT_NAMES = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8"}  # autotune types
TACTICS = {1: "decode", 2: "prefill"}  # kv_attention tactic id -> tile phase (TILE_TABLE)
# Scalar arguments of the AOT kernels, in kernel order (after the inputs, before the outputs).
ATTENTION_SCALARS = ("S_NEW", "S_MAX", "HQ", "HKV", "WINDOW", "QK_SCALE")
SAMPLE_SCALARS = ("B", "V")
LOG2E = 1.4426950408889634

# kernel(tag, spec) -> (entry name, PTX text, launch JSON as written by arx.plugins.aot)
KernelSource = Callable[[str, dict], Tuple[str, str, dict]]


def attention_tag(dtype: str, head_dim: int, mask: str, phase: str, cache: str = "") -> str:
    """PTX variant tag: everything an attention PTX is specialized on (scale/window are not);
    a cache of the activations' dtype is not named (the tags of kits before int8 caches)."""
    kv = f"_kv{cache}" if cache and cache != dtype else ""
    return f"kv_attention_{dtype}{kv}_d{head_dim}_{mask}_{phase}"


def check_cache(dtype: str, cache: str) -> None:
    if (dtype, cache) not in CACHE_COMBOS:
        raise ValueError(f"arx::kv_attention takes a {dtype} cache, fp16 or int8 with {dtype} "
                         f"activations, not {cache}")


def sample_tag(dtype: str, guidance: bool) -> str:
    return f"sample_{dtype}" + ("_cfg" if guidance else "")


def qk_scale_bits(scale: float, head_dim: int) -> int:
    """The QK_SCALE scalar: fp32 bits (as a signed int32) of scale * log2(e), where scale
    0.0 means 1/sqrt(head_dim). log2(e) is folded in here, once, in double precision."""
    s = scale if scale > 0.0 else 1.0 / math.sqrt(head_dim)
    return struct.unpack("<i", struct.pack("<f", s * LOG2E))[0]


def dtype_tag(trt_dtype, table=DTYPES) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    if name not in table:
        what = "/".join(table.values())
        raise ValueError(f"arx plugins support {what} here, got {trt_dtype}")
    return table[name]


def import_tensorrt():
    """(tensorrt, tensorrt.plugin) under either import name (`tensorrt_bindings` is the wheel's)."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        import tensorrt_bindings as trt
        import tensorrt_bindings.plugin as trtp
    return trt, trtp


def register_descriptors(trt, trtp) -> None:
    """Register both plugins' IO descriptions and tactics (once per process)."""
    op = getattr(trtp.op, "arx", None)
    if op is None or not hasattr(op, "kv_attention"):
        _describe_attention(trtp)
    if op is None or not hasattr(op, "sample"):
        _describe_sample(trt, trtp)


def _describe_attention(trtp) -> None:
    TD = trtp.TensorDesc

    @trtp.register(KV_ATTENTION)
    def _describe(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                  new_len: TD, k_scale: TD, v_scale: TD, mask: str, scale: float,
                  window: int) -> Tuple[TD, TD, TD]:
        return q.like(), k_cache.aliased(), v_cache.aliased()  # the cache is written in place

    @trtp.autotune(KV_ATTENTION)
    def _autotune(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                  new_len: TD, k_scale: TD, v_scale: TD, mask: str, scale: float, window: int,
                  outputs: Tuple[TD]) -> list:
        return [trtp.AutoTuneCombination(attention_types(), "LINEAR", list(TACTICS))]


def attention_types() -> str:
    """kv_attention's io_types: '|' pairs the i-th type of every IO (tensorrt.plugin's
    dependent combination), one alternative per CACHE_COMBOS row; one type is every row's."""
    act = "|".join(_TRT_NAMES[a] for a, _ in CACHE_COMBOS)
    cache = "|".join(_TRT_NAMES[c] for _, c in CACHE_COMBOS)
    return ", ".join([act] * 3 + [cache] * 2 + ["INT32"] * 2 + ["FP32"] * 2 + [act] + [cache] * 2)


def _describe_sample(trt, trtp) -> None:
    TD = trtp.TensorDesc

    @trtp.register(SAMPLE)
    def _describe(logits: TD, params: TD, presence: TD, seed: TD, offset: TD, row: TD,
                  guidance: int) -> Tuple[TD]:
        return (trtp.from_shape_expr((params.shape_expr[0],), dtype=trt.int32),)

    @trtp.autotune(SAMPLE)
    def _autotune(logits: TD, params: TD, presence: TD, seed: TD, offset: TD, row: TD,
                  guidance: int, outputs: Tuple[TD]) -> list:
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32, BOOL, INT64, INT64, INT64, INT32",
                                         "LINEAR")]


def register_aot(trtp, kernel: KernelSource) -> None:
    """AOT implementations of both plugins, taking their PTX from `kernel` (re-registering
    replaces the previous source: tensorrt.plugin keeps the last aot_impl)."""
    TD = trtp.TensorDesc

    @trtp.aot_impl(KV_ATTENTION)
    def _attention(q: TD, k_new: TD, v_new: TD, k_cache: TD, v_cache: TD, past_len: TD,
                   new_len: TD, k_scale: TD, v_scale: TD, mask: str, scale: float, window: int,
                   outputs: Tuple[TD], tactic: int):
        return attention_launch(trtp, kernel, (q, k_new, k_cache), mask, scale, window, tactic)

    @trtp.aot_impl(SAMPLE)
    def _sample(logits: TD, params: TD, presence: TD, seed: TD, offset: TD, row: TD,
                guidance: int, outputs: Tuple[TD], tactic: int):
        return sample_launch(trtp, kernel, logits, params, guidance)


def _checked(meta: dict, tag: str, scalars: tuple) -> dict:
    if tuple(meta.get("scalars", ())) != scalars:  # a PTX from another arx version
        raise ValueError(f"PTX {tag} takes scalars {meta.get('scalars')}, this registration "
                         f"passes {list(scalars)}: recompile the PTX (rebuild the kit)")
    return meta


def attention_launch(trtp, kernel: KernelSource, descs, mask, scale, window, tactic):
    """(entry, PTX, launch params, int32 scalars) of one kv_attention launch.

    grid (cdiv(S_new * Hq/Hkv, BLOCK_M), B * Hkv), scalars ATTENTION_SCALARS."""
    q, k_new, k_cache = descs
    d = q.shape_expr[3]
    if not d.is_constant:
        raise ValueError("arx::kv_attention needs a static head_dim (last dim of q)")
    spec = dict(dtype=dtype_tag(q.dtype), head_dim=d.constant_value, mask=mask,
                phase=TACTICS.get(tactic, "prefill"), cache=dtype_tag(k_cache.dtype, CACHE_DTYPES))
    check_cache(spec["dtype"], spec["cache"])
    tag = attention_tag(**spec)
    entry, ptx, meta = kernel(tag, dict(spec, op="kv_attention"))
    _checked(meta, tag, ATTENTION_SCALARS)
    b, s_new, hq, hkv = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], k_new.shape_expr[2]
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(s_new * (hq // hkv), meta["constexprs"]["BLOCK_M"])
    params.grid_y = b * hkv
    params.block_x = meta["block"][0]
    params.shared_mem = meta["shared_mem"]
    values = (s_new, k_cache.shape_expr[2], hq, hkv, int(window),
              qk_scale_bits(float(scale), d.constant_value))
    extra = trtp.SymIntExprs(len(values))
    for i, v in enumerate(values):  # must be SymInt32: a bare int would become a SymIntExpr
        extra[i] = trtp.SymInt32(v)
    return entry, ptx, params, extra


def sample_launch(trtp, kernel: KernelSource, logits, params, guidance):
    """(entry, PTX, launch params, int32 scalars) of one sample launch: one program per row."""
    spec = dict(dtype=dtype_tag(logits.dtype), guidance=bool(guidance))
    tag = sample_tag(**spec)
    entry, ptx, meta = kernel(tag, dict(spec, op="sample"))
    _checked(meta, tag, SAMPLE_SCALARS)
    # a PTX from before the row input has the same scalars and one input pointer fewer
    if "ROW" not in meta.get("signature", {"ROW": "*i64"}):
        raise ValueError(f"PTX {tag} takes no row input, this registration passes one: "
                         f"recompile the PTX (rebuild the kit)")
    b, v = params.shape_expr[0], logits.shape_expr[1]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = b
    launch.block_x = meta["block"][0]
    launch.shared_mem = meta["shared_mem"]
    extra = trtp.SymIntExprs(2)
    extra[0], extra[1] = trtp.SymInt32(b), trtp.SymInt32(v)
    return entry, ptx, launch, extra


def load_variants(folder: str) -> dict:
    """tag -> (PTX text, launch JSON) for every <tag>.<sm>.ptx in `folder`."""
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


def folder_kernels(folder: str) -> KernelSource:
    """A KernelSource reading the prebuilt PTX of a kit's plugins/ folder."""
    variants = load_variants(folder)

    def kernel(tag: str, spec: dict):
        if tag not in variants:
            raise KeyError(f"the kit has no PTX for {tag}; it has {sorted(variants)}")
        ptx, meta = variants[tag]
        return meta["entry"], ptx, meta

    return kernel


def register(folder: str) -> None:
    """Kit entry point (build_engine.py): both plugins, AOT from the PTX in `folder`."""
    trt, trtp = import_tensorrt()
    register_descriptors(trt, trtp)
    register_aot(trtp, folder_kernels(folder))
