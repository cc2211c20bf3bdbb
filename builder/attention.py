"""GroupQueryAttention (com.microsoft) -> RoPE ops + the `arx::kv_attention` plugin node.

The plugin takes RoPE already applied (plugins/attention/reference.py), so the graph applies it
with standard ops, gathering cos/sin at each token's absolute position as ORT's fused op does.
The pieces every attention rewrite shares (parse_gqa, project_qkv, merge_heads, and the native
TensorScatter + Attention form) live in export/attention_rewrite.py, since the bundle's
general-step graph is written with them at export.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from arx.errors import ArxError
from arx.export.attention_rewrite import Bookkeeping, GqaNode, merge_heads, project_qkv
from arx.export.graph_ir import Editor, add_initializer
from arx.export.kv_dtype import scale_name

from .schemas import DOMAIN, KV_ATTENTION, plugin_attrs

NO_SCALE = "arx/kv_attention/no_scale"  # the scale inputs of a float cache: (1,) 1.0, unread


def rewrite_attention(ed: Editor, g: GqaNode, head_dim: int, bk: Bookkeeping,
                      rope_cache: dict, aot: bool) -> None:
    """Replace one GroupQueryAttention node (removed by the caller) with the plugin form.

        q4, k4, v4 (project_qkv) ──────────────────────────────┐
            past_key_values.i.* (B,Hkv,S_max,D) ─────────────┤   past_len, new_len (B,) int32
                                                              ▼
                         arx::kv_attention(window = local_window_size) ──► present.i.* (aliased)
                              ▲ k_scale, v_scale: attach_cache_scales, after the precision pass
                                                    │ (B,S,Hq,D)
                                                 Reshape ──► (B,S,Hq*D) = the GQA output
    """
    n = g.node
    if g.softcap:
        raise ArxError(f"attention node {n.name} soft-caps its scores (softcap={g.softcap:g}, "
                       f"Gemma 2), which the arx::kv_attention plugin does not implement; build "
                       f"with --attention native (ONNX Attention has softcap)")
    q4, k4, v4 = project_qkv(ed, g, head_dim, bk, rope_cache)
    out4 = ed.fresh(f"{n.name}/attn")
    # GroupQueryAttention's local_window_size = W and the plugin's window = W mean the same
    # keys: j > p - W for the query at position p (checked against onnxruntime's own op in
    # tests/builder/test_attention_window.py); its "no window" is -1, the plugin's is 0.
    ed.node(KV_ATTENTION, [q4, k4, v4, n.inputs[3], n.inputs[4], bk.past_len, bk.new_len],
            [out4, n.outputs[1].name, n.outputs[2].name], domain=DOMAIN, name=f"{n.name}/kv_attention",
            mask="block" if bk.block else "causal", scale=g.scale, window=max(g.window, 0), **plugin_attrs(aot=aot))
    merge_heads(ed, n, out4, g.num_heads * head_dim)


def attach_cache_scales(model: ir.Model, cache_dtype: str,
                        scales: dict[str, np.ndarray] | None) -> None:
    """Give every kv_attention node its k_scale/v_scale inputs (plugins/trt_contract.py):
    an int8 cache's fp32 (Hkv, 1, D) scales of the layer (calibrate's, as the bundle's
    GroupQueryAttention had them), else the shared (1,) placeholder. Run after apply_precision,
    which lowers every fp32 initializer: the plugin takes its scales in fp32 in any precision,
    so its codes are ORT's."""
    graph = model.graph

    def initializer(name: str, value: np.ndarray) -> ir.Value:
        if name not in graph.initializers:
            add_initializer(graph, name, np.asarray(value, dtype=np.float32))
        return graph.initializers[name]

    for n in [n for n in graph if n.domain == DOMAIN and n.op_type == KV_ATTENTION]:
        if cache_dtype != "int8":
            values = [initializer(NO_SCALE, np.ones(1, np.float32))] * 2
        else:
            pasts = [p.name for p in n.inputs[3:5]]
            missing = [p for p in pasts if p not in (scales or {})]
            if missing:
                raise ArxError(f"an int8 cache needs a scale for {missing[0]}; calibrate the "
                               f"cache scales (arx calibrate --kv-dtype int8 --data FILE)")
            values = [initializer(scale_name(p), scales[p]) for p in pasts]
        n.resize_inputs(9)
        for j, value in enumerate(values, 7):
            n.replace_input_with(j, value)
