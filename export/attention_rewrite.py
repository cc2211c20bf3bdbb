"""GroupQueryAttention (com.microsoft) -> RoPE ops + ONNX TensorScatter + Attention (opset 24).

Shared by the bundle's general-step graph (export/step_graph.py: any width, ragged, with a past,
causal or block mask, on ORT CPU) and `arx build`'s TensorRT forms (builder/attention.py
swaps in the arx plugin instead of Attention; builder/tensorrt_form.py the static cache).

    q4, k4, v4 (project_qkv: (B,S,H,D), RoPE applied) ─Transpose─► (B,H,S,D)
    past_key_values.i.key (B,Hkv,S_max,D) ─TensorScatter(axis 2, write_indices = past_len)─►
        present.i.key                       (the same for the values)
    Attention(q, present.i.key, present.i.value, attn_mask, nonpad_kv_seqlen = past + new,
              scale, softmax_precision = fp32) ─► (B,Hq,S,D) ─Transpose, Reshape─► GQA output

TensorScatter (opset 24) is the ONNX form of an in-place cache write: TensorRT imports it as an
IKVCacheUpdateLayer, whose output shares the cache input's memory; on ONNX Runtime the output
bound to the input's buffer is written there. It writes the whole new block, padding included,
so a row's past length plus the block width must stay within the cache. ONNX Attention is
TensorRT's IAttention (GQA from the head counts); `nonpad_kv_seqlen` says how much of the static
cache is valid in each row.

attn_mask (B,1,S,S_max) bool, built once per window size and shared by every layer: the new
token at absolute position p of a row with `total` valid keys sees key j iff
    causal: j <= p          block (rows flagged in Bookkeeping.block): j < total
and j > p - W under a sliding window W (GroupQueryAttention's local_window_size; a lower bound
only, as in plugins/attention/reference.py). Rows past a sequence's new tokens (right padding)
see keys up to their clamped position; their outputs are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from arx.errors import ArxError

from .graph_ir import Editor, ValueLike

GQA = ("com.microsoft", "GroupQueryAttention")
NATIVE_OPSET = 24  # TensorScatter; Attention's nonpad_kv_seqlen input
_BHSD = [0, 2, 1, 3]  # (B,S,H,D) <-> (B,H,S,D)
# GroupQueryAttention attributes the rewrite understands; any other one set on a node is refused
# (smooth_softmax, qk_output, ... change the math the rewrites implement).
_KNOWN_ATTRS = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved",
                "local_window_size", "softcap"}
_NEUTRAL = {"softcap": 0.0, "smooth_softmax": 0, "qk_output": 0, "local_window_size": -1}


@dataclass(frozen=True)
class Bookkeeping:
    """Per-step sequence values shared by every layer (graph values, or their names)."""

    past_len: ValueLike  # (B,) int32: tokens already in each sequence's cache
    new_len: ValueLike  # (B,) int32: valid new tokens of each row (right padding after)
    positions: ValueLike  # (B, S) int64: absolute position of each new token, clamped to the cache
    s_max: int  # static cache length (the RoPE tables must cover it)
    new_len64: ValueLike = ""  # (B,) int64 copy of new_len (index arithmetic)
    past_len64: ValueLike = ""  # (B,) int64: the cache write position of each row (TensorScatter)
    total64: ValueLike = ""  # (B,) int64: valid cache entries after this step (past + new)
    keys: ValueLike = ""  # (T,) int64 key positions 0..T-1 when the cache length is dynamic
    block: ValueLike = ""  # (B,) bool: rows whose new block is bidirectional (mask "block")
    # (1,) int64: where set, Attention reads only the cache's first keys_end entries (keys is
    # then 0..keys_end-1): ORT CPU's Attention costs the whole buffer's length even past
    # nonpad_kv_seqlen, 45x the valid 128 keys' time in a 2048-entry buffer
    keys_end: ValueLike = ""


@dataclass(frozen=True)
class GqaNode:
    node: ir.Node
    num_heads: int
    kv_heads: int
    scale: float
    rotary: bool
    window: int  # local_window_size: a query sees the `window` latest keys; -1 = no window
    softcap: float = 0.0  # scores -> c * tanh(scores / c) before the mask (Gemma 2); 0 = none


def parse_gqa(node: ir.Node) -> GqaNode:
    attrs = {name: a.value for name, a in node.attributes.items()}
    for name, value in attrs.items():
        if name not in _KNOWN_ATTRS and _NEUTRAL.get(name) != value:
            raise ArxError(f"attention node {node.name} sets {name}={value!r}, which arx's "
                           f"attention rewrite does not implement; re-export without it")
    if attrs.get("rotary_interleaved", 0):
        raise ArxError(f"attention node {node.name} uses interleaved RoPE; arx's attention "
                       f"rewrite implements rotate-half RoPE only")
    return GqaNode(node, int(attrs["num_heads"]), int(attrs["kv_num_heads"]),
                   float(attrs.get("scale", 0.0)), bool(attrs.get("do_rotary", 0)),
                   int(attrs.get("local_window_size", -1)), float(attrs.get("softcap", 0.0)))


def project_qkv(ed: Editor, g: GqaNode, head_dim: int, bk: Bookkeeping,
                rope_cache: dict) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The GQA node's q, k, v as (B,S,H,D) with RoPE applied (every rewrite starts here).

        packed qkv (B,S,(Hq+2Hkv)*D) ─Split─┐          (or q, k, v given separately)
                  q (B,S,Hq*D) ─Reshape─► (B,S,Hq,D) ─RoPE─► q4
                  k (B,S,Hkv*D) ─Reshape─► (B,S,Hkv,D) ─RoPE─► k4
                  v (B,S,Hkv*D) ─Reshape─► (B,S,Hkv,D) ──────► v4
    """
    n = g.node
    hq, hkv, d = g.num_heads, g.kv_heads, head_dim
    q, k, v = n.inputs[0], n.inputs[1], n.inputs[2]
    if k is None:  # packed QKV
        q, k, v = ed.node("Split", [q, ed.const([hq * d, hkv * d, hkv * d])], 3, axis=-1,
                          name=f"{n.name}/split_qkv")
    q4 = ed.op("Reshape", q, ed.const([0, 0, hq, d]), name=f"{n.name}/q4")
    k4 = ed.op("Reshape", k, ed.const([0, 0, hkv, d]), name=f"{n.name}/k4")
    v4 = ed.op("Reshape", v, ed.const([0, 0, hkv, d]), name=f"{n.name}/v4")
    if g.rotary:
        tables = _rope_tables(ed, n, bk, rope_cache)
        q4 = _rotate(ed, q4, tables, d, f"{n.name}/rope_q")
        k4 = _rotate(ed, k4, tables, d, f"{n.name}/rope_k")
    return q4, k4, v4


def merge_heads(ed: Editor, n: ir.Node, out4, width: int) -> None:
    """(B,S,Hq,D) -> (B,S,Hq*D): the replaced node's output (its readers read this one)."""
    ed.node("Reshape", [out4, ed.const([0, 0, width])], [n.outputs[0].name], name=f"{n.name}/merge")


def rewrite_attention_native(ed: Editor, g: GqaNode, head_dim: int, bk: Bookkeeping,
                             rope_cache: dict, masks: dict) -> None:
    """Replace one GroupQueryAttention node (removed by the caller) with the native form."""
    n = g.node
    q4, k4, v4 = project_qkv(ed, g, head_dim, bk, rope_cache)
    q = ed.op("Transpose", q4, perm=_BHSD, name=f"{n.name}/q_bhsd")
    presents = [n.outputs[1].name, n.outputs[2].name]  # the new writes take these names
    for new, past, present, what in ((k4, n.inputs[3], presents[0], "key"),
                                     (v4, n.inputs[4], presents[1], "value")):
        ed.node("TensorScatter", [past, ed.op("Transpose", new, perm=_BHSD), bk.past_len64],
                [present], axis=2, mode="linear", name=f"{n.name}/write_{what}")
    attrs = {"softmax_precision": onnx.TensorProto.FLOAT}
    if g.scale:
        attrs["scale"] = g.scale
    if g.softcap:  # Attention-24 caps the scaled scores before mask and softmax, as GQA does
        attrs["softcap"] = g.softcap
    keys = presents
    if bk.keys_end:
        keys = [ed.op("Slice", p, ed.const([0]), bk.keys_end, ed.const([2]),
                      name=f"{n.name}/used_{what}") for p, what in zip(presents, ("key", "value"))]
    out = ed.op("Attention", q, *keys, attention_mask(ed, bk, g.window, masks),
                "", "", bk.total64, name=f"{n.name}/attention", **attrs)
    merge_heads(ed, n, ed.op("Transpose", out, perm=_BHSD, name=f"{n.name}/attn"),
                g.num_heads * head_dim)


def attention_mask(ed: Editor, bk: Bookkeeping, window: int, masks: dict) -> ir.Value:
    """(B,1,S,T) bool over the cache (see the module docstring), within `window` keys when > 0."""
    window = max(window, 0)
    if window not in masks:
        keys = bk.keys or ed.const(np.arange(bk.s_max, dtype=np.int64))  # (T,)
        pos = ed.op("Unsqueeze", bk.positions, ed.const([2]), name="mask/positions")  # (B,S,1)
        seen = ed.op("LessOrEqual", keys, pos, name="mask/causal")  # (B,S,T)
        if bk.block:
            total = ed.op("Unsqueeze", bk.total64, ed.const([1, 2]), name="mask/total")  # (B,1,1)
            rows = ed.op("Unsqueeze", bk.block, ed.const([1, 2]), name="mask/block_rows")
            # causal keys are a subset of the block's for every valid query: OR in the rest
            inside = ed.op("And", rows, ed.op("Less", keys, total), name="mask/block")
            seen = ed.op("Or", seen, inside)
        if window:
            recent = ed.op("Greater", keys, ed.op("Sub", pos, ed.const(window)),
                           name=f"mask/window{window}")
            seen = ed.op("And", seen, recent)
        masks[window] = ed.op("Unsqueeze", seen, ed.const([1]), name=f"mask/w{window}")
    return masks[window]


def _rope_tables(ed: Editor, n: ir.Node, bk: Bookkeeping, cache: dict):
    """cos/sin (B,S,1,R/2) at each new token's position; computed once, shared by all layers."""
    cos_table, sin_table = n.inputs[7], n.inputs[8]
    key = (cos_table.name, sin_table.name)
    if key not in cache:
        # dims only: the table's data may still be in an external file
        if not cos_table.is_initializer():
            raise ArxError(f"attention node {n.name}: the cos cache {cos_table.name} is not a "
                           f"constant; re-export the bundle")
        dims = cos_table.const_value.shape
        if dims[0] < bk.s_max:
            raise ArxError(f"the RoPE tables cover {dims[0]} positions, fewer than the "
                           f"cache length {bk.s_max}; lower --max-seq-len")
        axes = ed.const([2])
        cos = ed.op("Unsqueeze", ed.op("Gather", cos_table, bk.positions, name="rope/cos"), axes)
        sin = ed.op("Unsqueeze", ed.op("Gather", sin_table, bk.positions, name="rope/sin"), axes)
        cache[key] = (cos, sin, int(dims[1]) * 2)
    return cache[key]


def _rotate(ed: Editor, x: ir.Value, tables, d: int, name: str) -> ir.Value:
    """Rotate-half RoPE on the first R dims of x (B,S,H,D); dims past R pass through.

        x ─Split─► x1 (..,R/2), x2 (..,R/2)[, rest (..,D-R)]
        out = Concat(x1*cos - x2*sin, x2*cos + x1*sin[, rest])
    """
    cos, sin, r = tables
    sizes = [r // 2, r // 2] + ([d - r] if d > r else [])
    parts = ed.node("Split", [x, ed.const(sizes)], len(sizes), axis=-1, name=f"{name}/split")
    x1, x2 = parts[0], parts[1]
    o1 = ed.op("Sub", ed.op("Mul", x1, cos), ed.op("Mul", x2, sin))
    o2 = ed.op("Add", ed.op("Mul", x2, cos), ed.op("Mul", x1, sin))
    return ed.node("Concat", [o1, o2, *parts[2:]], 1, axis=-1, name=name)[0]
