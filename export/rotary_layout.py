"""Partial rotary widths GroupQueryAttention refuses, made acceptable by a head-dim permutation.

ORT's GroupQueryAttention (1.31) wants the cos/sin tables' width R/2 to be a multiple of 8.
Models that rotate only part of each head (Phi-2, GPT-NeoX, StableLM) may have R/2 = 10
(StableLM-3B: D 80, R 20), or 4 in the tiny test models. Rotate-half pairs dim j with j + R/2
for j < R/2 and passes dims R.. through. Widening the tables to R' (R'/2 the next multiple of 8,
at most D/2) with cos 1 and sin 0 in the new columns rotates nothing more, provided the head's
dims are reordered so the pairs line up with the wider halves:

    original  [ a (R/2) | b (R/2) | p (P) | rest ]          a_j pairs b_j, p and rest pass
    reordered [ a | p1 (P/2) | b | p2 (P/2) | rest ]         P = R' - R, p = p1 | p2

q and k are reordered the same way (their dot product is unchanged, v is not touched), so the
new layout is internal to the graph: the cache holds keys in it, nothing outside reads them.
The reorder is applied to the packed QKV columns (and bias) and to any q/k norm weights.
"""

from __future__ import annotations

import numpy as np

from arx.export.families import DecoderConfig
from arx.export.weights import LayerWeights

GQA_ROTARY_MULTIPLE = 16  # R' must be a multiple of 16: cos_cache width (R'/2) of 8


def padded_rotary_dim(cfg: DecoderConfig) -> int:
    """The table width (x2) the graph uses: cfg.rotary_dim, widened to a multiple of 16."""
    r = cfg.rotary_dim
    if r == 0 or r % GQA_ROTARY_MULTIPLE == 0:
        return r
    return min(-(-r // GQA_ROTARY_MULTIPLE) * GQA_ROTARY_MULTIPLE, cfg.head_dim)


def head_permutation(cfg: DecoderConfig) -> np.ndarray | None:
    """new dim -> original dim within one head, None when no reorder is needed."""
    r, wide, d = cfg.rotary_dim, padded_rotary_dim(cfg), cfg.head_dim
    if wide == r:
        return None
    half, pad = r // 2, (wide - r) // 2
    a, b = np.arange(half), np.arange(half, r)
    p1, p2 = np.arange(r, r + pad), np.arange(r + pad, r + 2 * pad)
    return np.concatenate([a, p1, b, p2, np.arange(wide, d)])


def widen_tables(tables: dict, cfg: DecoderConfig) -> dict:
    """cos/sin (S, R/2) -> (S, R'/2): the new columns rotate by 0 (cos 1, sin 0)."""
    pad = (padded_rotary_dim(cfg) - cfg.rotary_dim) // 2
    if not pad:
        return tables
    return {name: (np.pad(cos, ((0, 0), (0, pad)), constant_values=1.0),
                   np.pad(sin, ((0, 0), (0, pad)), constant_values=0.0))
            for name, (cos, sin) in tables.items()}


def reorder_layer(lw: LayerWeights, cfg: DecoderConfig) -> LayerWeights:
    """Apply head_permutation to one layer's q and k (in place; returned): the streamed
    export applies it to each layer as it is read."""
    perm = head_permutation(cfg)
    if perm is None:
        return lw
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q_cols = (np.arange(hq)[:, None] * d + perm).reshape(-1)
    k_cols = hq * d + (np.arange(hkv)[:, None] * d + perm).reshape(-1)
    cols = np.concatenate([q_cols, k_cols, np.arange((hq + hkv) * d, (hq + 2 * hkv) * d)])
    weight, bias = lw.qkv
    lw.qkv = (np.ascontiguousarray(weight[:, cols]), None if bias is None else bias[cols])
    lw.q_norm = _reorder_norm(lw.q_norm, perm, hq)
    lw.k_norm = _reorder_norm(lw.k_norm, perm, hkv)
    return lw


def _reorder_norm(norm, perm: np.ndarray, heads: int):
    """A q/k norm's weight (D,), (heads, D) or (heads*D,) follows its dims."""
    if norm is None:
        return None
    weight, bias = norm
    def move(t):
        if t is None:
            return None
        if t.ndim == 1 and t.shape[0] != perm.shape[0]:  # span "all": (heads*D,)
            return np.ascontiguousarray(t.reshape(heads, -1)[:, perm].reshape(-1))
        return np.ascontiguousarray(t[..., perm])
    return move(weight), move(bias)
