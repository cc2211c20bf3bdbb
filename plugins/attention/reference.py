"""NumPy reference of `arx::kv_attention`: this file is the op's specification.

Layouts (row-major, contiguous; the Triton kernel and the TensorRT plugin use the same):

    q        (B, S_new, Hq,  D)      new queries, RoPE already applied by the graph
    k_new    (B, S_new, Hkv, D)      new keys,    RoPE already applied by the graph
    v_new    (B, S_new, Hkv, D)
    k_cache  (B, Hkv, S_max, D)      the layer's preallocated cache, updated IN PLACE
    v_cache  (B, Hkv, S_max, D)
    past_len (B,) int32              tokens already in the cache for each sequence
    new_len  (B,) int32              valid new tokens per sequence (<= S_new; right padding)
    k_scale  (Hkv, 1, D) float32     int8 cache only: the per-channel step of each code
    v_scale  (Hkv, 1, D) float32     (not read for a float cache)
    out      (B, S_new, Hq, D)       same dtype as q; rows t >= new_len[b] are zeros

The cache holds q's dtype, float16 (in an fp32 or bf16 engine) or int8 codes. An int8 cache is
the one `arx export/calibrate --kv-dtype int8` gives onnxruntime's GroupQueryAttention: a value
x is written as clip(round_half_even(x / scale), -128, 127) with fp32 division, and read as
code * scale in fp32 (export/kv_dtype.py). A float16 cache rounds x to nearest even.

Per sequence b, with P = past_len[b], N = new_len[b]:
  1. cache[b, :, P + t] = encode(new[b, t]) for t < N (padded new tokens are never written);
     attention reads decode(cache), the new tokens included: they are attended as stored.
  2. query t < N of head h attends to kv head h // (Hq // Hkv) (GQA; MQA when Hkv == 1) over
     absolute key positions j in [0, P + N) where
       causal: j <= P + t              (prefill, decode, speculative verification)
       block:  all j < P + N           (bidirectional in the block, full over the past)
     and, when window W > 0, only keys less than W positions back: j > P + t - W (the query's
     own position counts, so a causal query sees at most W keys: Hugging Face's
     `sliding_window = W` and onnxruntime GroupQueryAttention's `local_window_size = W`).
  3. softmax(scale * q.k) @ v accumulated in fp32, cast to q's dtype; scale = 1/sqrt(D) unless
     given. Contract: P + N <= S_max (the kernel never writes outside the cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK_MODES = ("causal", "block")


@dataclass(frozen=True)
class AttentionOptions:
    """Attributes of `arx::kv_attention` (the TensorRT plugin fields have the same names)."""

    mask: str = "causal"
    scale: float = 0.0  # 0.0 means the default 1/sqrt(D); a float field has no "None"
    window: int = 0  # sliding window in keys (0 = none); an int attribute has no "None" either

    def __post_init__(self):
        if self.mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, got {self.mask!r}")
        if not (isinstance(self.window, (int, np.integer)) and 0 <= self.window < 2**31):
            raise ValueError(f"window must be an int32 >= 0 (0 = no window), got {self.window!r}")
        if not (self.scale >= 0.0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a finite number >= 0 (0 = 1/sqrt(D)), got {self.scale}")

    def resolved_scale(self, head_dim: int) -> float:
        return self.scale if self.scale > 0.0 else 1.0 / math.sqrt(head_dim)


def check_shapes(q_shape, k_new_shape, k_cache_shape, past_len_shape, new_len_shape) -> tuple:
    """Validate the layouts above; return (B, S_new, Hq, Hkv, S_max, D)."""
    if len(q_shape) != 4 or len(k_new_shape) != 4 or len(k_cache_shape) != 4:
        raise ValueError("q, k_new, v_new, k_cache, v_cache must be rank 4 "
                         "(B, S_new, H, D) and (B, Hkv, S_max, D)")
    b, s_new, hq, d = q_shape
    hkv = k_new_shape[2]
    if tuple(k_new_shape) != (b, s_new, hkv, d):
        raise ValueError(f"k_new/v_new must be (B, S_new, Hkv, D) = {(b, s_new, hkv, d)}, "
                         f"got {tuple(k_new_shape)}")
    if k_cache_shape[0] != b or k_cache_shape[1] != hkv or k_cache_shape[3] != d:
        raise ValueError(f"k_cache/v_cache must be (B, Hkv, S_max, D) with B={b}, Hkv={hkv}, "
                         f"D={d}; got {tuple(k_cache_shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if tuple(past_len_shape) != (b,) or tuple(new_len_shape) != (b,):
        raise ValueError("past_len and new_len must have shape (B,)")
    return b, s_new, hq, hkv, k_cache_shape[2], d


def _check_lengths(past_len, new_len, s_new: int, s_max: int) -> None:
    if np.any(past_len < 0) or np.any(new_len < 0) or np.any(new_len > s_new):
        raise ValueError("need past_len >= 0 and 0 <= new_len <= S_new")
    if np.any(past_len + new_len > s_max):
        raise ValueError("past_len + new_len exceeds the cache length S_max")


def channel_scales(k_scale, hkv: int, d: int) -> np.ndarray:
    """An int8 cache's scales as (Hkv, 1, D) float32 (the layout of GroupQueryAttention's
    PER_CHANNEL k_scale/v_scale), refusing any other size or a non-positive step."""
    if k_scale is None:
        raise ValueError("an int8 cache needs k_scale and v_scale (Hkv, 1, D) float32")
    s = np.asarray(k_scale)
    if s.dtype != np.float32 or s.size != hkv * d:
        raise ValueError(f"int8 cache scales must be float32 (Hkv, 1, D) = ({hkv}, 1, {d}), "
                         f"got {s.dtype} {s.shape}")
    s = s.reshape(hkv, 1, d)
    if not np.all(s > 0) or not np.all(np.isfinite(s)):
        raise ValueError("int8 cache scales must be finite and > 0")
    return s


def encode(x, cache_dtype, scale=None) -> np.ndarray:
    """What the cache stores for values x (..., Hkv, n, D) cast as their layout: int8 codes
    (scale (Hkv, 1, D)) or the cache's float type (round to nearest even)."""
    if np.dtype(cache_dtype) == np.int8:
        codes = np.rint(np.asarray(x, np.float32) / scale)  # np.rint: half to even, as ORT
        return np.clip(codes, -128, 127).astype(np.int8)
    return np.asarray(x).astype(cache_dtype)


def decode(cached, scale=None) -> np.ndarray:
    """fp32 values of cached entries (the int8 codes times their channel's scale)."""
    cached = np.asarray(cached)
    values = cached.astype(np.float32)
    return values * scale if cached.dtype == np.int8 else values


def kv_attention_reference(q, k_new, v_new, k_cache, v_cache, past_len, new_len=None,
                           options: AttentionOptions = AttentionOptions(), k_scale=None,
                           v_scale=None):
    """Return out (B, S_new, Hq, D); writes k_new/v_new into k_cache/v_cache in place, encoded
    in the caches' dtype (int8: k_scale/v_scale (Hkv, 1, D) float32, see the module doc)."""
    b, s_new, hq, hkv, s_max, d = check_shapes(q.shape, k_new.shape, k_cache.shape,
                                               np.shape(past_len), np.shape(new_len)
                                               if new_len is not None else np.shape(past_len))
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, np.float16, np.int8):
        raise ValueError(f"the caches hold q's dtype ({q.dtype}), float16 or int8 (both the "
                         f"same), got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.dtype == np.int8:
        k_scale, v_scale = channel_scales(k_scale, hkv, d), channel_scales(v_scale, hkv, d)
    past_len = np.asarray(past_len, dtype=np.int64)
    new_len = np.full(b, s_new, np.int64) if new_len is None else np.asarray(new_len, np.int64)
    _check_lengths(past_len, new_len, s_new, s_max)
    scale = options.resolved_scale(d)
    group = hq // hkv
    out = np.zeros(q.shape, dtype=np.float32)  # (B, S_new, Hq, D)
    for i in range(b):
        p, n = int(past_len[i]), int(new_len[i])
        # (S_new, Hkv, D) -> (Hkv, n, D): the cache layout
        k_cache[i, :, p:p + n] = encode(np.transpose(k_new[i, :n], (1, 0, 2)), k_cache.dtype,
                                        k_scale)
        v_cache[i, :, p:p + n] = encode(np.transpose(v_new[i, :n], (1, 0, 2)), v_cache.dtype,
                                        v_scale)
        if n == 0:
            continue
        keys = decode(k_cache[i, :, :p + n], k_scale)  # (Hkv, P+N, D) fp32
        vals = decode(v_cache[i, :, :p + n], v_scale)
        keys = np.repeat(keys, group, axis=0)  # (Hq, P+N, D): query head h uses kv head h//group
        vals = np.repeat(vals, group, axis=0)
        qi = np.transpose(q[i, :n].astype(np.float32), (1, 0, 2))  # (Hq, n, D)
        scores = scale * np.einsum("hqd,hkd->hqk", qi, keys)  # (Hq, n, P+N)
        visible = _visible(options.mask, p, n, options.window)  # (n, P+N)
        scores = np.where(visible[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[i, :n] = np.transpose(probs @ vals, (1, 0, 2))  # (n, Hq, D)
    return out.astype(q.dtype)


def _visible(mask: str, past: int, n: int, window: int = 0) -> np.ndarray:
    """(n, past + n) bool: may query t (absolute position past + t) see key position j."""
    j = np.arange(past + n)[None, :]
    t = np.arange(n)[:, None]
    seen = j <= past + t if mask == "causal" else np.broadcast_to(j < past + n, (n, past + n))
    if window > 0:  # a lower bound only: in block mode later keys of the block stay visible
        seen = seen & (j > past + t - window)
    return seen


def naive_attention(q, keys, values, scale: float, causal_offset: int | None,
                    window: int = 0, past: int = 0):
    """Textbook softmax attention for one sequence, as an independent check of the spec.

    q (S_q, Hq, D), keys/values (S_k, Hkv, D), plain float64 loops over heads; causal_offset is
    the number of past keys (query t sees keys j <= offset + t), None for no mask; window > 0
    drops keys j <= past + t - window (query t sits at absolute position past + t).
    """
    s_q, hq, _ = q.shape
    s_k, hkv, _ = keys.shape
    out = np.zeros(q.shape, np.float64)
    for h in range(hq):
        kh = h * hkv // hq
        for t in range(s_q):
            logits = [scale * float(np.dot(q[t, h], keys[j, kh])) for j in range(s_k)]
            if causal_offset is not None:
                logits = [x if j <= causal_offset + t else -math.inf for j, x in enumerate(logits)]
            if window > 0:
                logits = [x if j > past + t - window else -math.inf for j, x in enumerate(logits)]
            top = max(logits)
            w = [math.exp(x - top) for x in logits]
            total = sum(w)
            out[t, h] = sum((wj / total) * values[j, kh].astype(np.float64)
                            for j, wj in enumerate(w))
    return out
