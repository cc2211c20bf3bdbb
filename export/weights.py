"""Read a checkpoint's tensors into the canonical per-layer weights the builder emits.

The tensors come from a TensorSource (export/tensor_source.py); layers are read lazily, one
at a time as the builder iterates over them, so only one layer's arrays live at once.

Canonical layout: every linear is (in, out) so the graph computes `x @ W` with MatMul;
q, k, v are packed into one (hidden, (Hq + 2*Hkv) * head_dim) matrix so a layer does one
QKV MatMul, as onnxruntime-genai does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from arx.errors import ArxError
from arx.export.families import DecoderConfig, WeightNames
from arx.export.tensor_source import contiguous


Norm = tuple[np.ndarray, np.ndarray | None]  # (weight (H,), bias (H,) | None)


@dataclass
class Expert:
    gate: tuple[np.ndarray, None]  # (H, I)
    up: tuple[np.ndarray, None]  # (H, I)
    down: tuple[np.ndarray, None]  # (I, H)


@dataclass
class LayerWeights:
    attn_norm: Norm | None  # None: no norm before attention
    qkv: tuple[np.ndarray, np.ndarray | None]  # (H, (Hq+2Hkv)*D), bias
    o: tuple[np.ndarray, np.ndarray | None]  # (Hq*D, H)
    mlp_norm: Norm | None  # None: none, or the attention norm's output (parallel "shared")
    up: tuple[np.ndarray, np.ndarray | None] | None  # (H, I); None in a MoE layer
    down: tuple[np.ndarray, np.ndarray | None] | None  # (I, H)
    gate: tuple[np.ndarray, np.ndarray | None] | None = None  # (H, I) when gated
    q_norm: Norm | None = None  # (D,) per head, (Hq, D) one per head, (Hq*D,) span "all"
    k_norm: Norm | None = None
    attn_post_norm: Norm | None = None  # on the attention output (Gemma 2/3, OLMo 2)
    mlp_post_norm: Norm | None = None
    router: np.ndarray | None = None  # MoE: (E, H), as HF stores it
    experts: list[Expert] = field(default_factory=list)  # MoE layers: one per expert



@dataclass
class DecoderWeights:
    embed: np.ndarray  # (V, H)
    final_norm: Norm
    lm_head: np.ndarray | None  # (V, H); None when tied to embed
    lm_head_bias: np.ndarray | None = None  # (V,)
    layers: Sequence[LayerWeights] = field(default_factory=list)
    pos_embed: np.ndarray | None = None  # (max_pos, H) learned positions


class LazyLayers(Sequence[LayerWeights]):
    """layers[i] reads layer i from the checkpoint when asked (each time: nothing is kept)."""

    def __init__(self, count: int, read: Callable[[int], LayerWeights]):
        self.count, self.read = count, read

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.read(j) for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return self.read(i % self.count)


class _Reader:
    def __init__(self, state, names: WeightNames, cfg: DecoderConfig):
        # a TensorSource (export/tensor_source.py), or a dict of arrays: read by [name]
        self.state, self.names, self.cfg = state, names, cfg

    def get(self, key: str) -> np.ndarray:
        try:
            return np.ascontiguousarray(self.state[key], dtype=np.float32)
        except KeyError:
            raise ArxError(f"checkpoint has no weight {key!r}; it does not match its config's "
                           f"architecture (re-save it with save_pretrained)") from None

    def opt(self, key: str) -> np.ndarray | None:
        return self.get(key) if key in self.state else None

    def norm(self, prefix: str | None, size: int) -> Norm | None:
        """(weight, bias | None) of a norm; Gemma's (1 + w) is folded into the weight here, and
        a norm without parameters (OLMo) gets a weight of ones."""
        if prefix is None:
            return None
        if not self.cfg.norm_params:
            return np.ones(size, np.float32), None
        if "{h}" in prefix:  # one norm per head (StableLM): (heads, D) weights
            return np.stack([self.get(prefix.format(h=h) + ".weight")
                             for h in range(size // self.cfg.head_dim)]), None
        weight = self.get(prefix + ".weight") + np.float32(self.cfg.norm_offset)
        bias = self.opt(prefix + ".bias") if self.cfg.norm == "layer" else None
        return weight, bias

    def linear(self, prefix: str, bias: bool):
        """Return (W (in, out), b) whatever the checkpoint's layout."""
        key = prefix + ".weight"
        transposed = getattr(self.state, "transposed", None)  # TensorSources: one copy
        if not self.names.linear_is_out_in:
            w = self.get(key)
        elif transposed is not None and key in self.state:
            w = transposed(key)
        else:
            w = contiguous(self.get(key).T)
        return w, (self.opt(prefix + ".bias") if bias else None)

    def split_rows(self, prefix: str, sizes: list[int], bias: bool):
        """Split a fused linear by output features; returns [(W (in, out_i), b_i)]."""
        w, b = self.linear(prefix, bias)
        cuts = np.cumsum(sizes)[:-1]
        ws = np.split(w, cuts, axis=1)
        bs = np.split(b, cuts) if b is not None else [None] * len(sizes)
        return [(contiguous(x), y) for x, y in zip(ws, bs)]


def _per_head_rows(wb, heads: int, head_dim: int):
    """GPT-NeoX's fused QKV: out features ordered (head, q|k|v, D) -> (q|k|v, head, D)."""
    w, b = wb
    w = w.reshape(w.shape[0], heads, 3, head_dim).transpose(0, 2, 1, 3).reshape(w.shape[0], -1)
    if b is not None:
        b = b.reshape(heads, 3, head_dim).transpose(1, 0, 2).reshape(-1)
    return np.ascontiguousarray(w), b


def _cat(parts):
    w = np.concatenate([p[0] for p in parts], axis=1)
    b = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return w, b


def read_weights(cfg: DecoderConfig, names: WeightNames, state,
                 layer_hook: Callable[[LayerWeights], LayerWeights] | None = None) -> DecoderWeights:
    """`state`: a TensorSource (export/tensor_source.py) or a dict. The layers are read lazily;
    `layer_hook` transforms each as it is read (the rotary head reorder)."""
    r = _Reader(state, names, cfg)

    def layer(i: int) -> LayerWeights:
        lw = _read_layer(r, cfg, i, {k: (v.format(i=i, h="{h}") if isinstance(v, str) else v)
                                     for k, v in names.__dict__.items()})
        return layer_hook(lw) if layer_hook else lw

    layers = LazyLayers(cfg.num_layers, layer)
    lm_head = None
    if not cfg.tie_embeddings and names.lm_head:
        lm_head = r.get(names.lm_head)
    bias = r.get(names.lm_head.replace(".weight", ".bias")) if cfg.lm_head_bias else None
    return DecoderWeights(
        embed=r.get(names.embed),
        final_norm=r.norm(names.final_norm, cfg.hidden_size),
        lm_head=lm_head,
        lm_head_bias=bias,
        layers=layers,
        pos_embed=r.get(names.pos_embed) if names.pos_embed else None,
    )


def _read_layer(r: _Reader, cfg: DecoderConfig, i: int, n: dict) -> LayerWeights:
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if n["qkv"] and n["qkv_per_head"]:
        qkv = _per_head_rows(r.linear(n["qkv"], cfg.qkv_bias), cfg.num_heads, cfg.head_dim)
    elif n["qkv"]:
        qkv = _cat(r.split_rows(n["qkv"], [q_out, kv_out, kv_out], cfg.qkv_bias))
    else:
        qkv = _cat([r.linear(n[x], cfg.qkv_bias) for x in ("q", "k", "v")])
    router, experts = None, []
    if cfg.is_moe(i):
        router, experts = r.get(n["router"] + ".weight"), _experts(r, cfg, n)
        gate = up = down = None
    elif n["gate_up"]:
        gate, up = r.split_rows(n["gate_up"], [cfg.intermediate_size] * 2, cfg.mlp_bias)
    else:
        gate = r.linear(n["gate"], cfg.mlp_bias) if cfg.gated_mlp else None
        up = r.linear(n["up"], cfg.mlp_bias)
    if not cfg.is_moe(i):
        down = r.linear(n["down"], cfg.mlp_bias)
    span = cfg.qk_norm_span == "all"  # OLMo 2 norms q (Hq*D) and k (Hkv*D) as wholes
    h = cfg.hidden_size
    return LayerWeights(
        attn_norm=r.norm(n["attn_norm"], h),
        qkv=qkv,
        o=r.linear(n["o"], cfg.o_bias),
        mlp_norm=None if cfg.parallel == "shared" else r.norm(n["mlp_norm"], h),
        gate=gate,
        up=up,
        down=down,
        q_norm=r.norm(n["q_norm"], q_out if span or "{h}" in n["q_norm"] else cfg.head_dim)
        if cfg.qk_norm else None,
        k_norm=r.norm(n["k_norm"], kv_out if span or "{h}" in n["k_norm"] else cfg.head_dim)
        if cfg.qk_norm else None,
        attn_post_norm=r.norm(n["attn_post_norm"], h),
        mlp_post_norm=r.norm(n["mlp_post_norm"], h),
        router=router,
        experts=experts,
    )


def _experts(r: _Reader, cfg: DecoderConfig, n: dict) -> list[Expert]:
    """transformers 5 stores experts fused: gate_up (E, 2I, H), down (E, H, I), no bias."""
    gate_up, down = r.get(n["experts_gate_up"]), r.get(n["experts_down"])
    i = cfg.moe_intermediate_size
    return [Expert((np.ascontiguousarray(gate_up[e, :i].T), None),
                   (np.ascontiguousarray(gate_up[e, i:].T), None),
                   (np.ascontiguousarray(down[e].T), None)) for e in range(cfg.num_experts)]
