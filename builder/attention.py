"""GroupQueryAttention (com.microsoft) -> RoPE ops + the `arx::kv_attention` plugin node.

The plugin takes RoPE already applied (plugins/attention/reference.py), so the graph applies it
with standard ops, gathering cos/sin at each token's absolute position as ORT's fused op does.
native_attention.py reuses parse_gqa/project_qkv/merge_heads for the plugin-free form.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from arx.errors import ArxError

from .graph_edit import GraphEditor, initializer
from .schemas import DOMAIN, KV_ATTENTION, plugin_attrs

GQA = ("com.microsoft", "GroupQueryAttention")
# GroupQueryAttention attributes the rewrite understands; any other one set on a node is refused
# (softcap, smooth_softmax, qk_output, ... change the math the plugin implements).
_KNOWN_ATTRS = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved",
                "local_window_size"}
_NEUTRAL = {"softcap": 0.0, "smooth_softmax": 0, "qk_output": 0, "local_window_size": -1}


@dataclass(frozen=True)
class Bookkeeping:
    """Per-step sequence values shared by every layer (names of graph values)."""

    past_len: str  # (B,) int32: tokens already in each sequence's cache
    new_len: str  # (B,) int32: valid new tokens of each row (right padding after)
    positions: str  # (B, S) int64: absolute position of each new token, clamped to the cache
    s_max: int  # static cache length
    new_len64: str = ""  # (B,) int64 copy of new_len (index arithmetic)
    past_len64: str = ""  # (B,) int64: the cache write position of each row (TensorScatter)
    total64: str = ""  # (B,) int64: valid cache entries after this step (past + new)


@dataclass(frozen=True)
class GqaNode:
    node: onnx.NodeProto
    num_heads: int
    kv_heads: int
    scale: float
    rotary: bool
    window: int  # local_window_size: a query sees the `window` latest keys; -1 = no window


def parse_gqa(node: onnx.NodeProto) -> GqaNode:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for name, value in attrs.items():
        if name not in _KNOWN_ATTRS and _NEUTRAL.get(name) != value:
            raise ArxError(f"attention node {node.name} sets {name}={value!r}, which the "
                           f"TensorRT form does not implement; re-export without it")
    if attrs.get("rotary_interleaved", 0):
        raise ArxError(f"attention node {node.name} uses interleaved RoPE; the TensorRT form "
                       f"implements rotate-half RoPE only")
    return GqaNode(node, int(attrs["num_heads"]), int(attrs["kv_num_heads"]),
                   float(attrs.get("scale", 0.0)), bool(attrs.get("do_rotary", 0)),
                   int(attrs.get("local_window_size", -1)))


def project_qkv(ed: GraphEditor, g: GqaNode, head_dim: int, bk: Bookkeeping,
                rope_cache: dict) -> tuple[str, str, str]:
    """The GQA node's q, k, v as (B,S,H,D) with RoPE applied (both attention forms start here).

        packed qkv (B,S,(Hq+2Hkv)*D) ─Split─┐          (or q, k, v given separately)
                  q (B,S,Hq*D) ─Reshape─► (B,S,Hq,D) ─RoPE─► q4
                  k (B,S,Hkv*D) ─Reshape─► (B,S,Hkv,D) ─RoPE─► k4
                  v (B,S,Hkv*D) ─Reshape─► (B,S,Hkv,D) ──────► v4
    """
    n = g.node
    hq, hkv, d = g.num_heads, g.kv_heads, head_dim
    q, k, v = n.input[0], n.input[1], n.input[2]
    if not k:  # packed QKV
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


def rewrite_attention(ed: GraphEditor, g: GqaNode, head_dim: int, bk: Bookkeeping,
                      rope_cache: dict, aot: bool) -> None:
    """Replace one GroupQueryAttention node (removed by the caller) with the plugin form.

        q4, k4, v4 (project_qkv) ──────────────────────────────┐
            past_key_values.i.* (B,Hkv,S_max,D) ─────────────┤   past_len, new_len (B,) int32
                                                              ▼
                         arx::kv_attention(window = local_window_size) ──► present.i.* (aliased)
                                                    │ (B,S,Hq,D)
                                                 Reshape ──► (B,S,Hq*D) = the GQA output
    """
    n = g.node
    q4, k4, v4 = project_qkv(ed, g, head_dim, bk, rope_cache)
    out4 = ed.fresh(f"{n.name}/attn")
    # GroupQueryAttention's local_window_size = W and the plugin's window = W mean the same
    # keys: j > p - W for the query at position p (checked against onnxruntime's own op in
    # tests/builder/test_attention_window.py); its "no window" is -1, the plugin's is 0.
    ed.node(KV_ATTENTION, [q4, k4, v4, n.input[3], n.input[4], bk.past_len, bk.new_len],
            [out4, n.output[1], n.output[2]], domain=DOMAIN, name=f"{n.name}/kv_attention",
            mask="causal", scale=g.scale, window=max(g.window, 0), **plugin_attrs(aot=aot))
    merge_heads(ed, n, out4, g.num_heads * head_dim)


def merge_heads(ed: GraphEditor, n: onnx.NodeProto, out4: str, width: int) -> None:
    """(B,S,Hq,D) -> (B,S,Hq*D): the replaced node's output."""
    ed.node("Reshape", [out4, ed.const([0, 0, width])], [n.output[0]], name=f"{n.name}/merge")


def _rope_tables(ed: GraphEditor, n: onnx.NodeProto, bk: Bookkeeping, cache: dict):
    """cos/sin (B,S,1,R/2) at each new token's position; computed once, shared by all layers."""
    key = (n.input[7], n.input[8])
    if key not in cache:
        table = initializer(ed.graph, n.input[7])
        if table is None:
            raise ArxError(f"attention node {n.name}: the cos cache {n.input[7]} is not a "
                           f"constant; re-export the bundle")
        if table.shape[0] < bk.s_max:
            raise ArxError(f"the RoPE tables cover {table.shape[0]} positions, fewer than the "
                           f"cache length {bk.s_max}; lower --max-seq-len")
        axes = ed.const([2])
        cos = ed.op("Unsqueeze", ed.op("Gather", n.input[7], bk.positions, name="rope/cos"), axes)
        sin = ed.op("Unsqueeze", ed.op("Gather", n.input[8], bk.positions, name="rope/sin"), axes)
        cache[key] = (cos, sin, int(table.shape[1]) * 2)
    return cache[key]


def _rotate(ed: GraphEditor, x: str, tables, d: int, name: str) -> str:
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
