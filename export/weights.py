"""Read a checkpoint's state dict into the canonical per-layer weights the builder emits.

Canonical layout: every linear is (in, out) so the graph computes `x @ W` with MatMul;
q, k, v are packed into one (hidden, (Hq + 2*Hkv) * head_dim) matrix so a layer does one
QKV MatMul, as onnxruntime-genai does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from arx.errors import ArxError
from arx.export.families import DecoderConfig, WeightNames


@dataclass
class LayerWeights:
    attn_norm: tuple[np.ndarray, np.ndarray | None]  # (weight (H,), bias (H,) | None)
    qkv: tuple[np.ndarray, np.ndarray | None]  # (H, (Hq+2Hkv)*D), bias
    o: tuple[np.ndarray, np.ndarray | None]  # (Hq*D, H)
    mlp_norm: tuple[np.ndarray, np.ndarray | None]
    up: tuple[np.ndarray, np.ndarray | None]  # (H, I)
    down: tuple[np.ndarray, np.ndarray | None]  # (I, H)
    gate: tuple[np.ndarray, np.ndarray | None] | None = None  # (H, I) when gated
    q_norm: np.ndarray | None = None  # (D,)
    k_norm: np.ndarray | None = None


@dataclass
class DecoderWeights:
    embed: np.ndarray  # (V, H)
    final_norm: tuple[np.ndarray, np.ndarray | None]
    lm_head: np.ndarray | None  # (V, H); None when tied to embed
    layers: list[LayerWeights] = field(default_factory=list)
    pos_embed: np.ndarray | None = None  # (max_pos, H) learned positions


class _Reader:
    def __init__(self, state: dict[str, np.ndarray], names: WeightNames):
        self.state, self.names = state, names

    def get(self, key: str) -> np.ndarray:
        try:
            return np.ascontiguousarray(self.state[key], dtype=np.float32)
        except KeyError:
            raise ArxError(f"checkpoint has no weight {key!r}; it does not match its config's "
                           f"architecture (re-save it with save_pretrained)") from None

    def opt(self, key: str) -> np.ndarray | None:
        return self.get(key) if key in self.state else None

    def norm(self, prefix: str, with_bias: bool):
        return self.get(prefix + ".weight"), self.get(prefix + ".bias") if with_bias else None

    def linear(self, prefix: str, bias: bool):
        """Return (W (in, out), b) whatever the checkpoint's layout."""
        w = self.get(prefix + ".weight")
        w = w.T if self.names.linear_is_out_in else w
        return np.ascontiguousarray(w), (self.opt(prefix + ".bias") if bias else None)

    def split_rows(self, prefix: str, sizes: list[int], bias: bool):
        """Split a fused linear by output features; returns [(W (in, out_i), b_i)]."""
        w, b = self.linear(prefix, bias)
        cuts = np.cumsum(sizes)[:-1]
        ws = np.split(w, cuts, axis=1)
        bs = np.split(b, cuts) if b is not None else [None] * len(sizes)
        return [(np.ascontiguousarray(x), y) for x, y in zip(ws, bs)]


def _cat(parts):
    w = np.concatenate([p[0] for p in parts], axis=1)
    b = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return w, b


def read_weights(cfg: DecoderConfig, names: WeightNames, state: dict[str, np.ndarray]) -> DecoderWeights:
    r = _Reader(state, names)
    layer_norm = cfg.norm == "layer"
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = []
    for i in range(cfg.num_layers):
        n = {k: (v.format(i=i) if isinstance(v, str) else v) for k, v in names.__dict__.items()}
        if n["qkv"]:
            qkv = _cat(r.split_rows(n["qkv"], [q_out, kv_out, kv_out], cfg.qkv_bias))
        else:
            qkv = _cat([r.linear(n[x], cfg.qkv_bias) for x in ("q", "k", "v")])
        if n["gate_up"]:
            gate, up = r.split_rows(n["gate_up"], [cfg.intermediate_size] * 2, cfg.mlp_bias)
        else:
            gate = r.linear(n["gate"], cfg.mlp_bias) if cfg.gated_mlp else None
            up = r.linear(n["up"], cfg.mlp_bias)
        layers.append(LayerWeights(
            attn_norm=r.norm(n["attn_norm"], layer_norm),
            qkv=qkv,
            o=r.linear(n["o"], cfg.o_bias),
            mlp_norm=r.norm(n["mlp_norm"], layer_norm),
            gate=gate,
            up=up,
            down=r.linear(n["down"], cfg.mlp_bias),
            q_norm=r.get(n["q_norm"] + ".weight") if cfg.qk_norm else None,
            k_norm=r.get(n["k_norm"] + ".weight") if cfg.qk_norm else None,
        ))
    lm_head = None
    if not cfg.tie_embeddings and names.lm_head:
        lm_head = r.get(names.lm_head)
    return DecoderWeights(
        embed=r.get(names.embed),
        final_norm=r.norm(names.final_norm, layer_norm),
        lm_head=lm_head,
        layers=layers,
        pos_embed=r.get(names.pos_embed) if names.pos_embed else None,
    )
