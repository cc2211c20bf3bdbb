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

The "op" form (cfg.moe_form, `arx export --moe op`, the default for gated-SiLU experts) is one
com.microsoft MoE node, which runs only the k chosen experts of each token:

    h (B,S,H) ─Reshape─► (B*S,H) ─┐
    router logits ─Reshape─► (B*S,E) ─MoE(k, swiglu, normalize_routing_weights)─Reshape─► (B,S,H)
        fc1 (E, 2I, H): gate and up rows interleaved (swiglu_fusion=1), fc2 (E, H, I): (out, in)

ORT 1.31 CPU takes the logits and does the top k and the softmax itself: normalize 1 is the
softmax over the k chosen (= Mixtral's renormalised weights), normalize 0 the softmax over all
E at the chosen (= Qwen3-MoE without norm_topk_prob); both checked against the dense form
(tests/export/test_moe_op.py). Calibration and the TensorRT forms take the dense form, which
export/moe_rewrite.py rebuilds from the node with the emitter below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from arx.errors import ArxError
from arx.export.graph import MS_DOMAIN, GraphBuilder

MOE_FORMS = ("op", "dense")  # arx export --moe
MOE_OP = (MS_DOMAIN, "MoE")


@dataclass(frozen=True)
class Routing:
    """What the dense emitter reads of a DecoderConfig (also rebuilt from an MoE node)."""

    num_experts: int
    experts_per_token: int
    norm_topk_prob: bool
    activation: str = "silu"


def moe_form(cfg, asked: str | None) -> str:
    """The form a model's MoE layers take: "" without experts; `asked` (--moe) or, by default,
    "op" where ORT's MoE op computes the experts (gated SiLU, no biases: its swiglu)."""
    if asked is not None and asked not in MOE_FORMS:
        raise ArxError(f"--moe must be one of {', '.join(MOE_FORMS)} (got {asked})")
    if not cfg.num_experts:
        return ""
    fits = cfg.activation == "silu"
    if asked == "op" and not fits:
        raise ArxError(f"--moe op: onnxruntime's MoE op has no gated {cfg.activation} experts "
                       f"(only SwiGLU); export with --moe dense")
    return asked or ("op" if fits else "dense")


def moe_mlp(g: GraphBuilder, cfg, i: int, lw, h: str, expert_mlp) -> str:
    """The MoE block of layer i on h (B,S,H); `expert_mlp(g, cfg, name, weights, h)` emits one
    expert's gated MLP, the same emitter the dense MLP uses."""
    p = f"layers.{i}.mlp"
    table = g.weight(f"{p}.router.weight", lw.router)  # (E, H) as HF stores it
    logits = g.op("MatMul", h, g.op("Transpose", table, perm=[1, 0]), name=f"{p}.router")
    if getattr(cfg, "moe_form", "") == "op":
        return _moe_op(g, cfg, lw.experts, h, logits, p)
    return dense_experts(g, cfg, logits, lw.experts, h, expert_mlp, p)


def dense_experts(g, cfg, logits: str, experts, h: str, expert_mlp, p: str) -> str:
    """Every expert on h (B,S,H), weighted by the routing of the logits (B,S,E); `g` is a
    GraphBuilder or anything with its weight/const/op (export/moe_rewrite.py)."""
    probs = g.op("Softmax", logits, axis=-1, name=f"{p}.router_softmax")  # (B,S,E)
    chosen = g.op("Less", _rank(g, probs, cfg.num_experts, p),
                  g.const(float(cfg.experts_per_token), np.float32), name=f"{p}.topk")
    routing = g.op("Where", chosen, probs, g.const(0.0, np.float32), name=f"{p}.routing")
    if cfg.norm_topk_prob:  # (B,S,E) / (B,S,1)
        routing = g.op("Div", routing, g.op("ReduceSum", routing, g.const([-1]), keepdims=1),
                       name=f"{p}.renormalise")
    out = ""
    for e, weights in enumerate(experts):
        y = expert_mlp(g, cfg, f"{p}.experts.{e}", weights, h)  # (B,S,H)
        r = g.op("Gather", routing, g.const([e]), axis=-1, name=f"{p}.weight_{e}")  # (B,S,1)
        y = g.op("Mul", y, r)
        out = y if not out else g.op("Add", out, y)
    return out


def _moe_op(g: GraphBuilder, cfg, experts, h: str, logits: str, p: str) -> str:
    """One com.microsoft MoE node (module docstring): each expert's weights as (out, in)."""
    fc1 = np.stack([_interleave(x.gate[0].T, x.up[0].T) for x in experts])  # (E, 2I, H)
    fc2 = np.stack([x.down[0].T for x in experts])  # (E, H, I)
    # token rows (B*S, H) in and out: given the (B,S,H) form, ORT 1.31's CPU kernel returned
    # wrong outputs inside the tiny Qwen3-MoE decoder, though the same inputs alone were right
    rows = g.op("Reshape", h, g.const([-1, fc1.shape[2]]), name=f"{p}.token_rows")
    flat = g.op("Reshape", logits, g.const([-1, cfg.num_experts]), name=f"{p}.router_rows")
    y = g.op("MoE", rows, flat, g.weight(f"{p}.experts.fc1", fc1), "",
             g.weight(f"{p}.experts.fc2", fc2), domain=MS_DOMAIN, name=f"{p}.moe",
             k=int(cfg.experts_per_token), activation_type="swiglu", swiglu_fusion=1,
             activation_alpha=1.0, activation_beta=0.0, swiglu_limit=1e30,  # no clamp
             normalize_routing_weights=int(bool(cfg.norm_topk_prob)))
    return g.op("Reshape", y, g.op("Shape", h), name=f"{p}.moe_out")  # (B,S,H)


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(I, H) gate and up -> (2I, H) rows g0, u0, g1, u1, ... (swiglu_fusion=1)."""
    out = np.empty((2 * gate.shape[0], gate.shape[1]), gate.dtype)
    out[0::2], out[1::2] = gate, up
    return out


def split_fc1(fc1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_interleave's inverse: (2I, H) -> gate (I, H), up (I, H)."""
    return fc1[0::2], fc1[1::2]


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
