"""GroupQueryAttention -> standard ONNX ops that TensorRT builds natively (no arx plugin).

    q4, k4, v4 (project_qkv: (B,S,H,D), RoPE applied) ─Transpose─► (B,H,S,D)
    past_key_values.i.key (B,Hkv,S_max,D) ─TensorScatter(axis 2, write_indices = past_len)─►
        present.i.key                       (the same for the values)
    Attention(q, present.i.key, present.i.value, attn_mask, nonpad_kv_seqlen = past + new,
              scale, softmax_precision = fp32) ─► (B,Hq,S,D) ─Transpose, Reshape─► GQA output

TensorScatter (opset 24) is the ONNX form of an in-place cache write: TensorRT imports it as an
IKVCacheUpdateLayer, whose output shares the cache input's memory, so the runtime binds
present.i.* to the address of past_key_values.i.* exactly as for the plugin form. ONNX
Attention (opset 23/24) is TensorRT's IAttention (fused kernels; GQA from the head counts);
`nonpad_kv_seqlen` tells the kernel how much of the static cache is valid in each row.

attn_mask (B,1,S,S_max) bool, built once per window size and shared by every layer: the new
token at absolute position p sees key j iff j <= p (causal) and j > p - W (sliding window W,
GroupQueryAttention's local_window_size). Rows past a sequence's new tokens (right padding)
see only keys up to their clamped position; their outputs are never read.
"""

from __future__ import annotations

import numpy as np
import onnx

from .attention import Bookkeeping, GqaNode, merge_heads, project_qkv
from .graph_edit import GraphEditor

NATIVE_OPSET = 24  # TensorScatter; Attention's nonpad_kv_seqlen input
_BHSD = [0, 2, 1, 3]  # (B,S,H,D) <-> (B,H,S,D)


def rewrite_attention_native(ed: GraphEditor, g: GqaNode, head_dim: int, bk: Bookkeeping,
                             rope_cache: dict, masks: dict) -> None:
    """Replace one GroupQueryAttention node (removed by the caller) with the native form."""
    n = g.node
    q4, k4, v4 = project_qkv(ed, g, head_dim, bk, rope_cache)
    q = ed.op("Transpose", q4, perm=_BHSD, name=f"{n.name}/q_bhsd")
    for new, past, present, what in ((k4, n.input[3], n.output[1], "key"),
                                     (v4, n.input[4], n.output[2], "value")):
        ed.node("TensorScatter", [past, ed.op("Transpose", new, perm=_BHSD), bk.past_len64],
                [present], axis=2, mode="linear", name=f"{n.name}/write_{what}")
    attrs = {"softmax_precision": onnx.TensorProto.FLOAT}
    if g.scale:
        attrs["scale"] = g.scale
    out = ed.op("Attention", q, n.output[1], n.output[2], attention_mask(ed, bk, g.window, masks),
                "", "", bk.total64, name=f"{n.name}/attention", **attrs)
    merge_heads(ed, n, ed.op("Transpose", out, perm=_BHSD, name=f"{n.name}/attn"),
                g.num_heads * head_dim)


def attention_mask(ed: GraphEditor, bk: Bookkeeping, window: int, masks: dict) -> str:
    """(B,1,S,S_max) bool: causal over the static cache, within `window` keys when > 0."""
    window = max(window, 0)
    if window not in masks:
        keys = ed.const(np.arange(bk.s_max, dtype=np.int64))  # (S_max,)
        pos = ed.op("Unsqueeze", bk.positions, ed.const([2]), name="mask/positions")  # (B,S,1)
        seen = ed.op("LessOrEqual", keys, pos, name="mask/causal")  # (B,S,S_max)
        if window:
            recent = ed.op("Greater", keys, ed.op("Sub", pos, ed.const(window)),
                           name=f"mask/window{window}")
            seen = ed.op("And", seen, recent)
        masks[window] = ed.op("Unsqueeze", seen, ed.const([1]), name=f"mask/w{window}")
    return masks[window]
