"""Emit the decoder ONNX graph: one graph for prefill and decode, KV cache as explicit state.

    input_ids (B,S) ─Gather(embed)─┬─(+ Gather(pos_embed, position_ids) when positions are learned)
                                   ▼
                        ┌──── layer i (× L) ─────────────────────────────────────────┐
     x (B,S,H) ─norm─ MatMul(Wqkv) ─► GroupQueryAttention ◄── past_key_values.{i}.* │
        │                               │   (RoPE inside; writes new K/V in place)   │
        │                               ├──► present.{i}.key / .value                │
        └────────── Add ◄── MatMul(Wo) ◄┘                                            │
                     └─norm─ MLP (gated SiLU or GELU) ─ Add ─► x                      │
                        └────────────────────────────────────────────────────────────┘
                                   ▼
            final norm ─ GatherND(logits_indices) ─ MatMul(lm_head) ─► logits (B,K,V)

What families do differently (docs/design.md, "More families") are DecoderConfig switches
emitted only where set: embedding scales, norms before and/or after each branch, parallel
branches, residual and logit scales, soft-caps, per-layer windows and RoPE tables (none, local,
global), q/k norms, and mixture-of-experts MLPs (export/moe_graph.py).

Attention is one op per layer (com.microsoft GroupQueryAttention): ORT implements it on CPU
and CUDA with a shared past/present buffer, and `arx build` swaps it for the arx TensorRT
plugin. Sequence bookkeeping comes from `attention_mask` (B, total_len), as in
onnxruntime-genai: seqlens_k = sum(mask) - 1, total_sequence_length = mask.shape[1].
The op is right for decode and for a prefill with no past; export/step_graph.py derives from
this graph the general-step graph (any width after a past, any batch, causal or block mask).

`logits_indices` (B, K) picks, per sequence, the positions of the new block whose logits are
computed: the runtime asks for each prompt's last token only (the LM head over a whole prompt
is most of a prefill's work at large vocabularies), parity and perplexity ask for all of them.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from arx.errors import ArxError
from arx.export.families import DecoderConfig
from arx.export.graph import MS_DOMAIN, GraphBuilder
from arx.export.moe_graph import moe_mlp
from arx.export.tensor_source import contiguous
from arx.export.weights import DecoderWeights, LayerWeights
from arx.manifest import KVLayout, Stage, TensorSpec

B, S, TOTAL, PAST = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
K = "logits_length"  # positions per sequence that get logits


TOKEN_INPUTS = {"input_ids": ("int64", (B, S)), "inputs_embeds": ("float32", (B, S, "hidden"))}


def decoder_io(cfg: DecoderConfig, kv: KVLayout, token_input: str = "input_ids"
               ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The decoder's IO, derived from the config: the manifest records exactly this.
    token_input "inputs_embeds": the decoder takes (B, S, hidden) embeddings instead of ids (an
    embedder stage, or the caller, makes them)."""
    dtype, shape = TOKEN_INPUTS[token_input]
    shape = tuple(cfg.hidden_size if d == "hidden" else d for d in shape)
    inputs = [TensorSpec(token_input, dtype, shape),
              TensorSpec("attention_mask", "int64", (B, TOTAL))]
    if cfg.positions == "learned":
        inputs.append(TensorSpec("position_ids", "int64", (B, S)))
    inputs.append(TensorSpec("logits_indices", "int64", (B, K)))
    cache_shape = (B, kv.kv_heads, PAST, kv.head_dim)  # (B, kv_heads, S_max, D) when in place
    outputs = [TensorSpec("logits", "float32", (B, K, cfg.vocab_size))]
    for past, present in kv.pairs():
        inputs.append(TensorSpec(past, kv.dtype, cache_shape))
        outputs.append(TensorSpec(present, kv.dtype, cache_shape))
    return inputs, outputs


def build_decoder(cfg: DecoderConfig, w: DecoderWeights, kv: KVLayout,
                  rope: dict[str, tuple[np.ndarray, np.ndarray]] | None,
                  file: str = "decoder.onnx", token_input: str = "input_ids", head=None, *,
                  writer=None, dtype: str = "float32", quantizer=None):
    """Return (ModelProto, Stage). `rope` maps each RoPE table a layer uses (cfg.rope_table)
    to (cos, sin), each (max_seq_len, rotary_dim/2). `head(g, rows)`, if given, writes
    `logits` from the (B, K, H) rows instead of the LM head (Janus' generation head).
    dtype: the weights' and activations' float type (logits leave as float32); writer: an
    ExternalDataWriter the weights stream to as they are emitted (export/external_data.py)."""
    g = GraphBuilder("arx_decoder", float_dtype=dtype, writer=writer, quantizer=quantizer)
    inputs, outputs = decoder_io(cfg, kv, token_input)
    for t in inputs:
        g.input(t.name, t.dtype, t.shape)
    x = _embed(g, cfg, w, token_input)
    seqlens_k, total_len = _sequence_bookkeeping(g)
    tables = {name: (g.weight(_rope_name(name, "cos"), cos), g.weight(_rope_name(name, "sin"), sin))
              for name, (cos, sin) in (rope or {}).items()}

    for i, lw in enumerate(w.layers):
        cos_sin = tables.get(cfg.rope_table(i))
        x = _layer(g, cfg, kv, i, lw, x, seqlens_k, total_len, cos_sin)

    x = _norm(g, cfg, x, w.final_norm, "final_norm")
    # (B, S, H) -> (B, K, H): only the rows that need logits reach the LM head
    picks = g.op("Unsqueeze", "logits_indices", g.const([-1]))  # (B, K, 1)
    x = g.op("GatherND", x, picks, batch_dims=1, name="logits_rows")
    if head is not None:
        head(g, x)
    else:
        _logits(g, cfg, w, x, None if g.quantizes("lm_head") else _lm_head(g, w))
    for t in outputs:  # logits above, present.* by the attention nodes
        g.output(t.name, t.dtype, t.shape)
    return g.model(), Stage(file, tuple(inputs), tuple(outputs))


TIED_TABLE = "embed_tokens.weight"  # _lm_head's answer for a head tied to the token table


def _head_matmul(g: GraphBuilder, w: DecoderWeights, x: str, head: str | None,
                 output: str | None = None) -> str:
    """x @ the LM head: `head` emitted by _lm_head, or None where it is quantized as emitted
    (a tied head then gets its own (H, V) copy, as arx calibrate unties it)."""
    if head == TIED_TABLE:
        return _tied_head(g, w, x, output)
    if head is not None:
        return g.node("MatMul", [x, head], [output] if output else 1, name="lm_head")[0]
    table = w.embed if w.lm_head is None else w.lm_head
    return g.matmul(x, "lm_head.weight", table.T, "lm_head", output)  # a view: quantized in chunks


def _lm_head(g: GraphBuilder, w: DecoderWeights) -> str:
    if w.lm_head is None:
        return TIED_TABLE
    return g.weight("lm_head.weight", contiguous(w.lm_head.T))


def _tied_head(g: GraphBuilder, w: DecoderWeights, x: str, output: str | None) -> str:
    """(B, K, H) rows @ the (V, H) token table, read as it is stored:

        x ─Reshape(-1, H)─ Gemm(table, transB=1) ─Reshape(B, -1, V)─►

    A Transpose of the table into a MatMul (this graph's form until 2026-12) is folded by ORT
    at every session open: for the 1B shape's 128k x 2048 table 2-4.6 s a session, and a
    runtime open of 13.4-15.5 s against 7.2 s (docs/design.md, "The tied LM head")."""
    vocab, hidden = w.embed.shape
    rows = g.op("Reshape", x, g.const([-1, hidden]), name="lm_head/rows")
    y = g.op("Gemm", rows, "embed_tokens.weight", name="lm_head", transB=1)
    # (B, -1, V), not (B, K, V): a prefill that asks for no logits has K = 0, which Reshape
    # would read as "copy that dim" (allowzero says otherwise, but not every backend takes it)
    shape = g.op("Concat", g.op("Shape", x, end=1, name="lm_head/b"), g.const([-1, vocab]),
                 axis=0, name="lm_head/shape")
    return g.node("Reshape", [y, shape], [output] if output else 1, name="lm_head/unflatten")[0]


def _rope_name(table: str, what: str) -> str:
    # the one-table families keep the names their bundles always had
    return f"rope.{what}_cache" if table == "default" else f"rope.{table}.{what}_cache"


def _embed(g: GraphBuilder, cfg: DecoderConfig, w: DecoderWeights, token_input: str) -> str:
    """(B, S, H): token embeddings (scaled where the model's embedding scales), positions."""
    if token_input == "input_ids":
        x = g.embedding("embed_tokens.weight", w.embed, "input_ids",
                        head="lm_head" if w.lm_head is None else None)
        if cfg.embed_scale != 1.0:  # Gemma: inside HF's embedding module, so not on embeds
            x = g.op("Mul", x, g.const(cfg.embed_scale, np.float32), name="embed_scale")
    else:  # (B, S, H) given; the table stays only where the tied LM head reads it
        if cfg.embed_scale != 1.0:
            raise ArxError(f"--inputs-embeds: {cfg.family}'s embedding scales its table by "
                           f"{cfg.embed_scale:g}, which the embedder stage does not do yet; "
                           f"export without --inputs-embeds")
        x = "inputs_embeds"
        if w.lm_head is None:
            g.weight("embed_tokens.weight", w.embed)
    if cfg.input_multiplier != 1.0:  # Granite: on whatever embeddings come in
        x = g.op("Mul", x, g.const(cfg.input_multiplier, np.float32), name="embed_multiplier")
    if cfg.positions == "learned":
        pos = g.op("Gather", g.weight("embed_positions.weight", w.pos_embed), "position_ids")
        x = g.op("Add", x, pos)
    return x


def _logits(g: GraphBuilder, cfg: DecoderConfig, w: DecoderWeights, x: str,
            head: str | None) -> None:
    """(B, K, H) -> logits (B, K, V): head MatMul, then bias, scale and soft-cap if any.

        x ─MatMul(head)─[Add(bias)]─[Mul(scale)]─[Div(c)─Tanh─Mul(c)]─► logits
    """
    steps = []
    if w.lm_head_bias is not None:
        steps.append(("Add", g.weight("lm_head.bias", w.lm_head_bias)))
    if cfg.logits_scale != 1.0:
        steps.append(("Mul", g.const(cfg.logits_scale, np.float32)))
    if not steps and not cfg.final_softcap and g.float_dtype == "float32":
        _head_matmul(g, w, x, head, "logits")
        return
    y = _head_matmul(g, w, x, head)
    for op, operand in steps:
        y = g.op(op, y, operand)
    if cfg.final_softcap:
        y = _softcap(g, y, cfg.final_softcap, "final_softcap")
    if g.float_dtype != "float32":  # the sampler reads fp32; (B, K, V) is small to cast
        g.node("Cast", [y], ["logits"], name="logits", to=TensorProto.FLOAT)
    else:
        g.node("Identity", [y], ["logits"], name="logits")


def _softcap(g: GraphBuilder, x: str, cap: float, name: str) -> str:
    c = g.const(cap, np.float32)
    return g.op("Mul", g.op("Tanh", g.op("Div", x, c), name=name), c)


def _sequence_bookkeeping(g: GraphBuilder) -> tuple[str, str]:
    """seqlens_k (B,) int32 = tokens per sequence - 1; total_sequence_length () int32."""
    lens = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)
    seqlens_k = g.op("Cast", g.op("Sub", lens, g.const(1)), to=6, name="seqlens_k")
    shape = g.op("Shape", "attention_mask")
    total = g.op("Cast", g.op("Gather", shape, g.const(1), axis=0), to=6, name="total_seq_len")
    return seqlens_k, total


def _norm(g: GraphBuilder, cfg: DecoderConfig, x: str, wb, name: str) -> str:
    """RMSNorm or LayerNorm over the last axis; a (heads, D) weight (one norm per head, x
    (B,S,heads,D)) is applied after a weightless norm, as ONNX scales by one (D,) vector."""
    weight, bias = wb
    per_head = weight.ndim == 2
    w = g.weight(f"{name}.weight", np.ones(weight.shape[-1], np.float32) if per_head else weight)
    if cfg.norm == "rms":
        y = g.op("RMSNormalization", x, w, axis=-1, epsilon=cfg.norm_eps, name=name)
    else:
        bias_in = [g.weight(f"{name}.bias", bias)] if bias is not None else []
        y = g.node("LayerNormalization", [x, w, *bias_in], 1, axis=-1, epsilon=cfg.norm_eps,
                   name=name)[0]
    return g.op("Mul", y, g.weight(f"{name}.head_weights", weight)) if per_head else y


def _linear(g: GraphBuilder, x: str, wb, name: str) -> str:
    weight, bias = wb
    y = g.matmul(x, f"{name}.weight", weight, name)
    return g.op("Add", y, g.weight(f"{name}.bias", bias)) if bias is not None else y


def _head_norm(g: GraphBuilder, cfg, x: str, wb, heads: int, name: str) -> str:
    """q/k norm: per head (B,S,heads*D) -> (B,S,heads,D) -> norm over D -> back, or over all
    heads at once (qk_norm_span "all", OLMo 2)."""
    if cfg.qk_norm_span == "all":
        return _norm(g, cfg, x, wb, name)
    x4 = g.op("Reshape", x, g.const([0, 0, heads, cfg.head_dim]))
    return g.op("Reshape", _norm(g, cfg, x4, wb, name), g.const([0, 0, heads * cfg.head_dim]))


def _attention(g, cfg, kv, i, lw: LayerWeights, h, seqlens_k, total_len, cos_sin) -> str:
    """One GroupQueryAttention node; RoPE inside it for layers with a table (cos_sin)."""
    p = f"layers.{i}.attn"
    qkv = _linear(g, h, lw.qkv, f"{p}.qkv_proj")  # (B, S, (Hq + 2*Hkv) * D)
    if cfg.clip_qkv:
        qkv = g.op("Clip", qkv, g.const(-cfg.clip_qkv, np.float32),
                   g.const(cfg.clip_qkv, np.float32), name=f"{p}.clip_qkv")
    if cfg.qk_norm:
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = g.node("Split", [qkv, g.const([q_out, kv_out, kv_out])], 3, axis=-1)
        q = _head_norm(g, cfg, q, lw.q_norm, cfg.num_heads, f"{p}.q_norm")
        k = _head_norm(g, cfg, k, lw.k_norm, cfg.num_kv_heads, f"{p}.k_norm")
    else:
        q, k, v = qkv, "", ""  # packed QKV input of GroupQueryAttention
    attrs = dict(num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads)
    if cfg.attn_scale:
        attrs["scale"] = float(cfg.attn_scale)
    if cfg.attn_softcap:
        attrs["softcap"] = float(cfg.attn_softcap)
    window = cfg.window(i)
    if window and window < kv.max_seq_len:
        attrs["local_window_size"] = int(window)
    rope_inputs: list[str] = []
    if cos_sin is not None:
        attrs.update(do_rotary=1, rotary_interleaved=0)
        rope_inputs = list(cos_sin)
    past_k, past_v = kv.past_key.format(i=i), kv.past_value.format(i=i)
    present_k, present_v = kv.present_key.format(i=i), kv.present_value.format(i=i)
    out, _, _ = g.node("GroupQueryAttention",
                       [q, k, v, past_k, past_v, seqlens_k, total_len, *rope_inputs],
                       [g.fresh(f"{p}/out"), present_k, present_v],
                       domain=MS_DOMAIN, name=f"{p}.gqa", **attrs)
    return _linear(g, out, lw.o, f"{p}.o_proj")


def _activation(g: GraphBuilder, cfg: DecoderConfig, x: str) -> str:
    if cfg.activation == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if cfg.activation in ("gelu_tanh", "gelu"):
        return g.op("Gelu", x, approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
    raise ValueError(f"activation {cfg.activation!r} has no ONNX emission")


def _ffn(g, cfg: DecoderConfig, p: str, w, h: str) -> str:
    """Dense MLP on h: down(act(gate(h)) * up(h)), or down(act(up(h))) without a gate; `w` has
    .gate/.up/.down (a layer's, or one expert's)."""
    up = _linear(g, h, w.up, f"{p}.up_proj")
    if w.gate is not None:
        act = g.op("Mul", _activation(g, cfg, _linear(g, h, w.gate, f"{p}.gate_proj")), up)
    else:
        act = _activation(g, cfg, up)
    return _linear(g, act, w.down, f"{p}.down_proj")


def _mlp(g, cfg: DecoderConfig, i: int, lw: LayerWeights, h: str) -> str:
    if lw.experts:
        return moe_mlp(g, cfg, i, lw, h, _ffn)
    return _ffn(g, cfg, f"layers.{i}.mlp", lw, h)


def _layer(g, cfg, kv, i, lw: LayerWeights, x, seqlens_k, total_len, cos_sin) -> str:
    """One block. Sequential: x += attn(n1(x)); x += mlp(n2(x)). Parallel: x + attn(n1(x)) +
    mlp(n2(x)) (n2 = n1 for "shared"). Each branch may be post-normed before its add, and
    scaled by residual_scale (Granite); a missing pre-norm (OLMo 2) feeds x itself."""
    def pre(wb, name, default):
        return _norm(g, cfg, x, wb, f"layers.{i}.{name}") if wb is not None else default

    def branch(y, post, name):
        if post is not None:
            y = _norm(g, cfg, y, post, f"layers.{i}.{name}")
        if cfg.residual_scale != 1.0:
            y = g.op("Mul", y, g.const(cfg.residual_scale, np.float32))
        return y

    h = pre(lw.attn_norm, "attn_norm", x)
    a = branch(_attention(g, cfg, kv, i, lw, h, seqlens_k, total_len, cos_sin),
               lw.attn_post_norm, "attn_post_norm")
    if cfg.parallel:
        m = _mlp(g, cfg, i, lw, pre(lw.mlp_norm, "mlp_norm", h))
        return g.op("Add", g.op("Add", x, a), branch(m, lw.mlp_post_norm, "mlp_post_norm"))
    x = g.op("Add", x, a)
    m = _mlp(g, cfg, i, lw, pre(lw.mlp_norm, "mlp_norm", x))
    return g.op("Add", x, branch(m, lw.mlp_post_norm, "mlp_post_norm"))
