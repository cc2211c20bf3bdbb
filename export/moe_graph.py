"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) in standard ONNX ops.

    h (B,S,H) ─MatMul(Transpose(router (E,H)))─► router logits (B,S,E) ─Softmax─► probs
        rank (B,S,E) = experts beating each one (_rank) ─Less(k)─► chosen
        r = Where(chosen, probs, 0)         [r / ReduceSum(r): renormalised]   (B,S,E)
    out = Σ_e  r[..., e:e+1] * down_e(act(gate_e(h)) * up_e(h))          (B,S,H)

Every expert runs on every token and the weights of the unchosen ones are 0: exact, and each
expert is three plain MatMuls with 2-D weights named `layers.{i}.mlp.experts.{e}.*`, so the
weight-only and w8a8 calibrators quantize them like any linear, and the TensorRT forms take
them as they are. The cost is compute: E/k times the chosen experts' work (docs/design.md,
"Mixture of experts"). The router's (E,H) table goes through a Transpose (folded by ORT at
load) so that calibration, which quantizes MatMuls with 2-D initializer weights, leaves it
float: a 4-bit router flips the experts chosen.

Routing follows the model: Mixtral and Qwen3-MoE both take the softmax over all experts, then
the top k; Mixtral renormalises the k weights to sum to 1, Qwen3-MoE when `norm_topk_prob`.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from arx.export.graph import GraphBuilder


def moe_mlp(g: GraphBuilder, cfg, i: int, lw, h: str, expert_mlp) -> str:
    """The MoE block of layer i on h (B,S,H); `expert_mlp(g, cfg, name, weights, h)` emits one
    expert's gated MLP, the same emitter the dense MLP uses."""
    p = f"layers.{i}.mlp"
    table = g.weight(f"{p}.router.weight", lw.router)  # (E, H) as HF stores it
    logits = g.op("MatMul", h, g.op("Transpose", table, perm=[1, 0]), name=f"{p}.router")
    probs = g.op("Softmax", logits, axis=-1, name=f"{p}.router_softmax")  # (B,S,E)
    chosen = g.op("Less", _rank(g, probs, cfg.num_experts, p),
                  g.const(float(cfg.experts_per_token), np.float32), name=f"{p}.topk")
    routing = g.op("Where", chosen, probs, g.const(0.0, np.float32), name=f"{p}.routing")
    if cfg.norm_topk_prob:  # (B,S,E) / (B,S,1)
        routing = g.op("Div", routing, g.op("ReduceSum", routing, g.const([-1]), keepdims=1),
                       name=f"{p}.renormalise")
    out = ""
    for e, weights in enumerate(lw.experts):
        y = expert_mlp(g, cfg, f"{p}.experts.{e}", weights, h)  # (B,S,H)
        r = g.op("Gather", routing, g.const([e]), axis=-1, name=f"{p}.weight_{e}")  # (B,S,1)
        y = g.op("Mul", y, r)
        out = y if not out else g.op("Add", out, y)
    return out



def _rank(g: GraphBuilder, probs: str, experts: int, p: str) -> str:
    """(B,S,E): how many experts beat each one (higher probability, or equal and a lower index,
    as a stable top-k breaks ties); expert e is in the top k iff its rank < k.

        beats[b,s,e,j] = p_j > p_e  or  (p_j == p_e and j < e)      (B,S,E,E) -> ReduceSum(j)

    Comparisons instead of TopK + ScatterElements: TopK has no bfloat16 in opset 23 and the
    TensorRT forms run the graph in fp16/bf16; E*E comparisons a token is little next to E MLPs.
    """
    p_e = g.op("Unsqueeze", probs, g.const([-1]), name=f"{p}.p_e")  # (B,S,E,1)
    p_j = g.op("Unsqueeze", probs, g.const([-2]), name=f"{p}.p_j")  # (B,S,1,E)
    lower = g.const(np.tril(np.ones((experts, experts), bool), -1), np.bool_)  # [e, j]: j < e
    tie = g.op("And", g.op("Equal", p_j, p_e), lower)
    beats = g.op("Or", g.op("Greater", p_j, p_e), tie, name=f"{p}.beats")
    count = g.op("Cast", beats, to=g.float_type)  # compared with k in the graph's float type
    return g.op("ReduceSum", count, g.const([-1]), keepdims=0, name=f"{p}.rank")
