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

from arx.export.families import DecoderConfig
from arx.export.graph import MS_DOMAIN, GraphBuilder
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
                  rope: tuple[np.ndarray, np.ndarray] | None, file: str = "decoder.onnx",
                  token_input: str = "input_ids"):
    """Return (ModelProto, Stage). `rope` is (cos, sin), each (max_seq_len, rotary_dim/2)."""
    g = GraphBuilder("arx_decoder")
    inputs, outputs = decoder_io(cfg, kv, token_input)
    for t in inputs:
        g.input(t.name, t.dtype, t.shape)

    if token_input == "input_ids":
        x = g.op("Gather", g.weight("embed_tokens.weight", w.embed), "input_ids", name="embed")
    else:  # (B, S, H) given; the table stays only where the tied LM head reads it
        x = "inputs_embeds"
        if w.lm_head is None:
            g.weight("embed_tokens.weight", w.embed)
    if cfg.positions == "learned":
        pos = g.op("Gather", g.weight("embed_positions.weight", w.pos_embed), "position_ids")
        x = g.op("Add", x, pos)
    seqlens_k, total_len = _sequence_bookkeeping(g)
    cos_sin = None
    if rope is not None:
        cos_sin = (g.weight("rope.cos_cache", rope[0]), g.weight("rope.sin_cache", rope[1]))

    for i, lw in enumerate(w.layers):
        x = _layer(g, cfg, kv, i, lw, x, seqlens_k, total_len, cos_sin)

    x = _norm(g, cfg, x, w.final_norm, "final_norm")
    # (B, S, H) -> (B, K, H): only the rows that need logits reach the LM head
    picks = g.op("Unsqueeze", "logits_indices", g.const([-1]))  # (B, K, 1)
    x = g.op("GatherND", x, picks, batch_dims=1, name="logits_rows")
    if w.lm_head is None:  # tied: (V, H) -> (H, V); ORT folds the Transpose at load time
        head = g.op("Transpose", "embed_tokens.weight", perm=[1, 0], name="lm_head_tied")
    else:
        head = g.weight("lm_head.weight", np.ascontiguousarray(w.lm_head.T))
    g.node("MatMul", [x, head], ["logits"], name="lm_head")
    for t in outputs:  # logits above, present.* by the attention nodes
        g.output(t.name, t.dtype, t.shape)
    return g.model(), Stage(file, tuple(inputs), tuple(outputs))


def _sequence_bookkeeping(g: GraphBuilder) -> tuple[str, str]:
    """seqlens_k (B,) int32 = tokens per sequence - 1; total_sequence_length () int32."""
    lens = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)
    seqlens_k = g.op("Cast", g.op("Sub", lens, g.const(1)), to=6, name="seqlens_k")
    shape = g.op("Shape", "attention_mask")
    total = g.op("Cast", g.op("Gather", shape, g.const(1), axis=0), to=6, name="total_seq_len")
    return seqlens_k, total


def _norm(g: GraphBuilder, cfg: DecoderConfig, x: str, wb, name: str) -> str:
    weight, bias = wb
    w = g.weight(f"{name}.weight", weight)
    if cfg.norm == "rms":
        return g.op("RMSNormalization", x, w, axis=-1, epsilon=cfg.norm_eps, name=name)
    return g.op("LayerNormalization", x, w, g.weight(f"{name}.bias", bias), axis=-1,
                epsilon=cfg.norm_eps, name=name)


def _linear(g: GraphBuilder, x: str, wb, name: str) -> str:
    weight, bias = wb
    y = g.op("MatMul", x, g.weight(f"{name}.weight", weight), name=name)
    return g.op("Add", y, g.weight(f"{name}.bias", bias)) if bias is not None else y


def _head_norm(g: GraphBuilder, cfg, x: str, weight: np.ndarray, heads: int, name: str) -> str:
    """Per-head RMSNorm: (B,S,heads*D) -> (B,S,heads,D) -> norm over D -> back."""
    x4 = g.op("Reshape", x, g.const([0, 0, heads, cfg.head_dim]))
    y = g.op("RMSNormalization", x4, g.weight(f"{name}.weight", weight), axis=-1,
             epsilon=cfg.norm_eps, name=name)
    return g.op("Reshape", y, g.const([0, 0, heads * cfg.head_dim]))


def _attention(g, cfg, kv, i, lw: LayerWeights, h, seqlens_k, total_len, cos_sin) -> str:
    p = f"layers.{i}.attn"
    qkv = _linear(g, h, lw.qkv, f"{p}.qkv_proj")  # (B, S, (Hq + 2*Hkv) * D)
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
    if cfg.sliding_window and cfg.sliding_window < kv.max_seq_len:
        attrs["local_window_size"] = int(cfg.sliding_window)
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


def _layer(g, cfg, kv, i, lw: LayerWeights, x, seqlens_k, total_len, cos_sin) -> str:
    h = _norm(g, cfg, x, lw.attn_norm, f"layers.{i}.attn_norm")
    x = g.op("Add", x, _attention(g, cfg, kv, i, lw, h, seqlens_k, total_len, cos_sin))
    h = _norm(g, cfg, x, lw.mlp_norm, f"layers.{i}.mlp_norm")
    up = _linear(g, h, lw.up, f"layers.{i}.mlp.up_proj")
    if lw.gate is not None:
        act = g.op("Mul", _activation(g, cfg, _linear(g, h, lw.gate, f"layers.{i}.mlp.gate_proj")), up)
    else:
        act = _activation(g, cfg, up)
    return g.op("Add", x, _linear(g, act, lw.down, f"layers.{i}.mlp.down_proj"))
