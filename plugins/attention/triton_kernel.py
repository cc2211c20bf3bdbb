"""Triton face of `arx::kv_attention` (spec: reference.py; layouts repeated at each kernel).

One tile loop serves prefill and decode. Query rows are packed as (token, head-in-group) so the
Hq // Hkv query heads that share a kv head are one tile: each program reads its kv head's cache
once for the whole group (GQA/MQA decode reads the KV exactly once per M tile).

Kernels:
  _kv_attention_fwd    single pass; also the AOT/TensorRT kernel (its argument order is
                       TensorRT's: inputs, int32 scalars, outputs)
  _kv_attention_split  flash-decoding: the past is split over a third grid axis, partial
                       (acc, max, sum) go to fp32 scratch, _kv_attention_combine reduces them

New keys are read from k_new/v_new, never from the cache, and the cache is read only over
[0, past_len): the in-place cache write ([past_len, past_len + new_len)) cannot race the reads.

Cache dtypes (trt_contract.CACHE_COMBOS), read from the cache pointers' element type: q's own,
fp16 in an fp32/bf16 engine, or int8 codes with a per-channel fp32 scale (K_SCALE/V_SCALE
(Hkv, 1, D), loaded once per program). Each key/value tile is decoded where it is loaded, inside
the loop (int8: code * scale in fp32), never the whole cache; the new tokens are encoded as
the cache stores them (int8: clip(round half to even(x / scale)), ORT's quantization) both for
the write and for this step's own keys, so they are attended exactly as a later step reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._triton import next_pow2, require_triton
from ..trt_contract import ATTENTION_SCALARS, TACTICS, attention_tag, check_cache, qk_scale_bits

triton = require_triton()
import triton.language as tl  # noqa: E402  (after the friendly import check)

# Triton 3.9's interpreter multiplies bf16 tiles wrong in tl.dot (tests/plugins/test_attention.py
# pins the bug). Under the interpreter only, bf16 tiles are widened to fp32 before each dot: the
# products of bf16 values are exact in fp32 and tl.dot accumulates in fp32 anyway, so the result
# is the GPU's up to summation order. Compiled kernels (JIT on a GPU, AOT PTX) never take it.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_TYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
               "torch.int8": "int8"}  # torch dtype -> trt_contract's dtype names


@dataclass(frozen=True)
class TileConfig:
    """One row of the tuning table (data, not logic)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (phase, BLOCK_D) -> tiles. decode: packed rows (S_new * group) <= 16.
TILE_TABLE = {
    ("decode", 64): TileConfig(16, 64, 4, 2),
    ("decode", 128): TileConfig(16, 64, 4, 2),
    ("prefill", 64): TileConfig(64, 64, 4, 2),
    ("prefill", 128): TileConfig(64, 32, 4, 2),
}


def tile_config(rows: int, block_d: int) -> TileConfig:
    phase = "decode" if rows <= 16 else "prefill"
    return TILE_TABLE.get((phase, block_d), TileConfig(16 if phase == "decode" else 32, 32, 4, 1))


@triton.jit
def _round_half_even(y):
    """rint in exact steps (floor, the fraction, the parity): libdevice.rint has no
    interpreter form, and floor(y + 0.5) rounds the sum first (0.49999997 -> 1)."""
    f = tl.math.floor(y)
    frac = y - f  # exact: the fraction bits of y
    odd = (f - 2.0 * tl.math.floor(f * 0.5)) == 1.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), f + 1.0, f)


@triton.jit
def _encode(x, scale, CACHE):
    """Values x as the cache CACHE stores them: its float type, or int8 codes
    clip(round half to even(x / scale), -128, 127), with an IEEE division as ORT's."""
    if CACHE.dtype.element_ty == tl.int8:
        y = tl.math.div_rn(x.to(tl.float32), scale[None, :])
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)  # clip first: the same codes, a small range
        return _round_half_even(y).to(tl.int8)
    else:
        return x.to(CACHE.dtype.element_ty)


@triton.jit
def _decode(c, scale, like):
    """Cache entries c as values of `like`'s dtype (the dot's): int8 codes times their scale."""
    if c.dtype == tl.int8:
        return (c.to(tl.float32) * scale[None, :]).to(like.dtype)
    else:
        return c.to(like.dtype)


@triton.jit
def _channel_scale(SCALE, CACHE, kvh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_D,) fp32 step of kv head kvh's channels; 1 for a float cache (SCALE unread)."""
    d = tl.arange(0, BLOCK_D)
    if CACHE.dtype.element_ty == tl.int8:
        return tl.load(SCALE + kvh * HEAD_DIM + d, mask=d < HEAD_DIM, other=1.0)
    else:
        return tl.full((BLOCK_D,), 1.0, tl.float32)


@triton.jit
def _attend(q, acc, m_i, l_i, k_ptrs, v_ptrs, key_ok, key_mask, qk_scale, k_sc, v_sc,
            K_CACHE, V_CACHE, FROM_NEW: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """One online-softmax step over a (BLOCK_N, BLOCK_D) key/value tile (log2 domain).

    key_ok (BLOCK_N,): keys that exist; key_mask (BLOCK_M, BLOCK_N): which query sees which key.
    FROM_NEW: the tile is k_new/v_new, encoded as the cache stores it before it is decoded.
    """
    d_ok = tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM
    k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok, other=0.0)
    if FROM_NEW:
        k, v = _encode(k, k_sc, K_CACHE), _encode(v, v_sc, V_CACHE)
    k, v = _decode(k, k_sc, q), _decode(v, v_sc, q)
    if INTERPRETED and q.dtype == tl.bfloat16:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
    s = tl.where(key_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i starts at -1e30, never -inf
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _window_span(WINDOW):
    """The sliding window in keys; no window (0) becomes a span longer than any cache."""
    return tl.where(WINDOW > 0, WINDOW, 2147483647)


@triton.jit
def _window_lo(past, tok0, WINDOW):
    """First cache position any query from block token tok0 on can see, in [0, past]."""
    return tl.minimum(tl.maximum(past + tok0 - _window_span(WINDOW) + 1, 0), past)


@triton.jit
def _attend_range(Q, K_NEW, V_NEW, K_CACHE, V_CACHE, K_SCALE, V_SCALE, b, kvh, m_start, past,
                  n_new, lo, hi,
                  do_new, S_NEW, S_MAX, HQ, HKV, WINDOW, qk_scale, CAUSAL: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Attend one M tile to cache keys [lo, hi) and (if do_new) to the new keys.

    Window: query token tok (absolute position past + tok) sees key j only if
    j > past + tok - WINDOW; `first` is that bound per row. The caller starts lo at the tile's
    smallest bound, so keys no row can see are never read."""
    group = HQ // HKV
    r = m_start + tl.arange(0, BLOCK_M)
    tok = r // group
    head = kvh * group + r % group
    row_ok = tok < n_new
    span = _window_span(WINDOW)
    first = past + tok - span + 1  # (BLOCK_M,) first visible absolute key position
    d = tl.arange(0, BLOCK_D)
    # q (B, S_new, Hq, D)
    q_off = ((b * S_NEW + tok).to(tl.int64) * HQ + head) * HEAD_DIM
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
                other=0.0)
    if K_CACHE.dtype.element_ty == tl.float16 and Q.dtype.element_ty == tl.bfloat16:
        q = q.to(tl.float32)  # fp16 values are not all bf16 values: that pair's dots in fp32
    k_sc = _channel_scale(K_SCALE, K_CACHE, kvh, HEAD_DIM, BLOCK_D)
    v_sc = _channel_scale(V_SCALE, V_CACHE, kvh, HEAD_DIM, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    # cache (B, Hkv, S_max, D): every valid query sees the whole past under both masks
    cache_base = (b * HKV + kvh).to(tl.int64) * S_MAX * HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ptr = cache_base + j.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
        key_mask = row_ok[:, None] & (j < hi)[None, :] & (j[None, :] >= first[:, None])
        acc, m_i, l_i = _attend(q, acc, m_i, l_i, K_CACHE + ptr, V_CACHE + ptr, j < hi, key_mask,
                                qk_scale, k_sc, v_sc, K_CACHE, V_CACHE, False, HEAD_DIM, BLOCK_D)
    if do_new:
        # k_new/v_new (B, S_new, Hkv, D); causal: new key t2 visible to query tok iff t2 <= tok
        new_hi = n_new
        if CAUSAL:
            new_hi = tl.minimum(n_new, (m_start + BLOCK_M - 1) // group + 1)
        new_lo = tl.maximum(m_start // group - span + 1, 0)  # the window, in block positions
        for start in range(new_lo, new_hi, BLOCK_N):
            t2 = start + tl.arange(0, BLOCK_N)
            ptr = ((b * S_NEW + t2).to(tl.int64) * HKV + kvh)[:, None] * HEAD_DIM + d[None, :]
            key_mask = (row_ok[:, None] & (t2 < n_new)[None, :]
                        & ((past + t2)[None, :] >= first[:, None]))
            if CAUSAL:
                key_mask = key_mask & (t2[None, :] <= tok[:, None])
            acc, m_i, l_i = _attend(q, acc, m_i, l_i, K_NEW + ptr, V_NEW + ptr, t2 < n_new, key_mask,
                                    qk_scale, k_sc, v_sc, K_CACHE, V_CACHE, True, HEAD_DIM,
                                    BLOCK_D)
    return acc, m_i, l_i


@triton.jit
def _write_new_kv(K_NEW, V_NEW, K_OUT, V_OUT, K_SCALE, V_SCALE, b, kvh, m_start, past, n_new,
                  S_NEW, S_MAX, HQ, HKV, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """cache[b, kvh, past + t] = encode(new[b, t, kvh]) for the tokens of this M tile."""
    group = HQ // HKV
    tok_hi = (m_start + BLOCK_M - 1) // group
    t = m_start // group + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    ok = (t <= tok_hi) & (t < n_new) & (past + t < S_MAX)
    ok2 = ok[:, None] & (d[None, :] < HEAD_DIM)
    src = ((b * S_NEW + t).to(tl.int64) * HKV + kvh)[:, None] * HEAD_DIM + d[None, :]
    dst = ((b * HKV + kvh).to(tl.int64) * S_MAX + past + t)[:, None] * HEAD_DIM + d[None, :]
    k_sc = _channel_scale(K_SCALE, K_OUT, kvh, HEAD_DIM, BLOCK_D)
    v_sc = _channel_scale(V_SCALE, V_OUT, kvh, HEAD_DIM, BLOCK_D)
    tl.store(K_OUT + dst, _encode(tl.load(K_NEW + src, mask=ok2), k_sc, K_OUT), mask=ok2)
    tl.store(V_OUT + dst, _encode(tl.load(V_NEW + src, mask=ok2), v_sc, V_OUT), mask=ok2)


@triton.jit
def _kv_attention_fwd(Q, K_NEW, V_NEW, K_CACHE, V_CACHE, PAST_LEN, NEW_LEN, K_SCALE, V_SCALE,
                      S_NEW, S_MAX, HQ, HKV, WINDOW, QK_SCALE,
                      OUT, K_OUT, V_OUT,
                      CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grid (cdiv(S_new * Hq/Hkv, BLOCK_M), B * Hkv). OUT (B, S_new, Hq, D).

    WINDOW: sliding window in keys (0 = none). QK_SCALE: int32 bits of the fp32 value
    scale * log2(e) (TensorRT's AOT launch passes only int32 scalars; see trt_contract.py)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    m_start = pid_m * BLOCK_M
    past = tl.load(PAST_LEN + b)
    n_new = tl.load(NEW_LEN + b)
    _write_new_kv(K_NEW, V_NEW, K_OUT, V_OUT, K_SCALE, V_SCALE, b, kvh, m_start, past, n_new,
                  S_NEW, S_MAX, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_D)
    lo = _window_lo(past, m_start // (HQ // HKV), WINDOW)
    acc, m_i, l_i = _attend_range(Q, K_NEW, V_NEW, K_CACHE, V_CACHE, K_SCALE, V_SCALE, b, kvh,
                                  m_start, past, n_new, lo, past, True, S_NEW, S_MAX, HQ, HKV, WINDOW,
                                  QK_SCALE.to(tl.float32, bitcast=True), CAUSAL, HEAD_DIM,
                                  BLOCK_M, BLOCK_N, BLOCK_D)
    group = HQ // HKV
    r = m_start + tl.arange(0, BLOCK_M)
    tok = r // group
    head = kvh * group + r % group
    d = tl.arange(0, BLOCK_D)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # padded rows: acc = 0 -> zeros
    o_off = ((b * S_NEW + tok).to(tl.int64) * HQ + head) * HEAD_DIM
    tl.store(OUT + o_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty),
             mask=(tok < S_NEW)[:, None] & (d[None, :] < HEAD_DIM))


@triton.jit
def _kv_attention_split(Q, K_NEW, V_NEW, K_CACHE, V_CACHE, PAST_LEN, NEW_LEN, K_SCALE, V_SCALE,
                        S_NEW, S_MAX, HQ, HKV, WINDOW, QK_SCALE, ROWS,
                        K_OUT, V_OUT, ACC_PART, M_PART, L_PART,
                        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        NUM_SPLITS: tl.constexpr):
    """grid (m tiles, B * Hkv, NUM_SPLITS). ACC_PART (NUM_SPLITS, B*S_new*Hq, D) fp32,
    M_PART/L_PART (NUM_SPLITS, B*S_new*Hq) fp32. The last split also takes the new keys.
    The splits divide only the part of the past inside the tile's window."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    split = tl.program_id(2)
    m_start = pid_m * BLOCK_M
    past = tl.load(PAST_LEN + b)
    n_new = tl.load(NEW_LEN + b)
    if split == 0:
        _write_new_kv(K_NEW, V_NEW, K_OUT, V_OUT, K_SCALE, V_SCALE, b, kvh, m_start, past,
                      n_new, S_NEW, S_MAX, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_D)
    win_lo = _window_lo(past, m_start // (HQ // HKV), WINDOW)
    chunk = tl.cdiv(tl.cdiv(past - win_lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
    lo = tl.minimum(win_lo + split * chunk, past)
    hi = tl.minimum(lo + chunk, past)
    acc, m_i, l_i = _attend_range(Q, K_NEW, V_NEW, K_CACHE, V_CACHE, K_SCALE, V_SCALE, b, kvh,
                                  m_start, past, n_new, lo, hi, split == NUM_SPLITS - 1, S_NEW, S_MAX, HQ, HKV,
                                  WINDOW, QK_SCALE.to(tl.float32, bitcast=True), CAUSAL,
                                  HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    group = HQ // HKV
    r = m_start + tl.arange(0, BLOCK_M)
    tok = r // group
    row = (b * S_NEW + tok).to(tl.int64) * HQ + kvh * group + r % group
    part = split.to(tl.int64) * ROWS + row  # ROWS = B * S_new * Hq
    ok = tok < S_NEW
    d = tl.arange(0, BLOCK_D)
    tl.store(ACC_PART + part[:, None] * BLOCK_D + d[None, :], acc, mask=ok[:, None])
    tl.store(M_PART + part, m_i, mask=ok)
    tl.store(L_PART + part, l_i, mask=ok)


@triton.jit
def _kv_attention_combine(ACC_PART, M_PART, L_PART, OUT, ROWS, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """grid (ROWS,): merge the split partials of one (b, token, head) row into OUT."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, NUM_SPLITS)
    m = tl.load(M_PART + s * ROWS + row)  # (NUM_SPLITS,)
    l = tl.load(L_PART + s * ROWS + row)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)
    total = tl.sum(l * w, 0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(ACC_PART + (s * ROWS + row)[:, None] * BLOCK_D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(OUT + row * HEAD_DIM + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)


# ----------------------------------------------------------------------------- launchers
def _check(q, k_new, v_new, k_cache, v_cache, past_len, new_len):
    from .reference import check_shapes

    dims = check_shapes(q.shape, k_new.shape, k_cache.shape, past_len.shape, new_len.shape)
    for name, t in dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache).items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel derives strides from shapes)")
        if t.dtype != (k_cache.dtype if name.endswith("cache") else q.dtype):
            raise ValueError(f"{name} has dtype {t.dtype}: k_new/v_new must be q's ({q.dtype}), "
                             f"v_cache k_cache's ({k_cache.dtype})")
    check_cache(_TYPE_NAMES.get(str(q.dtype), str(q.dtype)),
                _TYPE_NAMES.get(str(k_cache.dtype), str(k_cache.dtype)))
    if v_cache.shape != k_cache.shape or v_new.shape != k_new.shape:
        raise ValueError("v_new/v_cache must have the shapes of k_new/k_cache")
    return dims


def _scales(k_cache, k_scale, v_scale, hkv: int, d: int):
    """The K_SCALE/V_SCALE arguments: an int8 cache's (Hkv, 1, D) fp32 scales, checked; for a
    float cache a 1-element tensor the kernel never reads (trt_contract: always two inputs)."""
    import torch

    if k_cache.dtype != torch.int8:  # TensorRT's JIT impl passes its placeholders through
        if k_scale is not None and v_scale is not None:
            return k_scale, v_scale
        one = torch.ones(1, dtype=torch.float32, device=k_cache.device)
        return one, one
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None or t.dtype != torch.float32 or t.numel() != hkv * d or not t.is_contiguous():
            raise ValueError(f"an int8 cache needs {name} as a contiguous float32 (Hkv, 1, D) = "
                             f"({hkv}, 1, {d}) tensor")
    return k_scale, v_scale


def default_num_splits(batch: int, kv_heads: int, rows: int, s_max: int, window: int = 0) -> int:
    """Flash-decoding split count: enough programs to fill a GPU without reading the cache
    length from the device (no host sync). Prefill tiles already give enough parallelism.
    A window bounds the keys read, so it bounds the splits too."""
    if rows > 16:
        return 1
    want = max(1, 128 // max(1, batch * kv_heads))  # ~one wave on a 100+ SM GPU
    keys = min(s_max, window) if window > 0 else s_max
    by_len = max(1, keys // 256)  # no split smaller than 256 keys
    return next_pow2(min(want, by_len, 16)) if min(want, by_len) > 1 else 1


def kv_attention(q, k_new, v_new, k_cache, v_cache, past_len, new_len=None, options=None,
                 num_splits: int | None = None, k_scale=None, v_scale=None):
    """Launch the kernel on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1).

    Layouts and cache dtypes as in reference.py; k_cache/v_cache are updated in place; returns
    out (B, S_new, Hq, D). num_splits > 1 uses the flash-decoding kernels (JIT only). An int8
    cache takes k_scale/v_scale (Hkv, 1, D) float32.
    """
    import torch

    from .reference import AttentionOptions

    options = options or AttentionOptions()
    if new_len is None:
        new_len = torch.full_like(past_len, q.shape[1])
    b, s_new, hq, hkv, s_max, d = _check(q, k_new, v_new, k_cache, v_cache, past_len, new_len)
    group = hq // hkv
    block_d = max(16, next_pow2(d))
    cfg = tile_config(s_new * group, block_d)
    splits = (default_num_splits(b, hkv, s_new * group, s_max, options.window)
              if num_splits is None else num_splits)
    if splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {splits}")
    out = torch.empty_like(q)  # (B, S_new, Hq, D)
    grid_m = triton.cdiv(s_new * group, cfg.block_m)
    meta = dict(CAUSAL=options.mask == "causal", HEAD_DIM=d,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    tail = (past_len.to(torch.int32).contiguous(), new_len.to(torch.int32).contiguous(),
            *_scales(k_cache, k_scale, v_scale, hkv, d))  # inputs 5-8, as in trt_contract
    # the same runtime scalars as the TensorRT AOT launch (trt_contract.ATTENTION_SCALARS)
    scalars = (s_new, s_max, hq, hkv, options.window, qk_scale_bits(options.scale, d))
    if splits == 1:
        _kv_attention_fwd[(grid_m, b * hkv)](q, k_new, v_new, k_cache, v_cache, *tail,
                                             *scalars, out, k_cache, v_cache, **meta)
        return out
    rows = b * s_new * hq
    acc = torch.empty((splits, rows, block_d), dtype=torch.float32, device=q.device)
    m_part = torch.empty((splits, rows), dtype=torch.float32, device=q.device)
    l_part = torch.empty((splits, rows), dtype=torch.float32, device=q.device)
    _kv_attention_split[(grid_m, b * hkv, splits)](q, k_new, v_new, k_cache, v_cache, *tail,
                                                   *scalars, rows, k_cache, v_cache,
                                                   acc, m_part, l_part, NUM_SPLITS=splits, **meta)
    _kv_attention_combine[(rows,)](acc, m_part, l_part, out, rows, HEAD_DIM=d, BLOCK_D=block_d,
                                   NUM_SPLITS=splits)
    return out


# ------------------------------------------------------------------ ahead-of-time variants
# tensorrt.plugin's AOT launch passes: input pointers, int32 scalars, output pointers. The
# scalars, tactics and tags are trt_contract's (shared with the build kits).
AOT_SCALARS = ATTENTION_SCALARS
AOT_GRID = ("cdiv(S_new * (Hq // Hkv), BLOCK_M)", "B * Hkv", "1")
AOT_TACTICS = TACTICS  # TensorRT tactic id -> tile phase of TILE_TABLE


@dataclass(frozen=True)
class AttentionVariant:
    """What one compiled PTX is specialized on. Scale and window are runtime scalars, so one
    PTX serves every scale and window."""

    dtype: str = "fp16"  # Triton type name: fp32 | fp16 | bf16
    head_dim: int = 128
    mask: str = "causal"
    phase: str = "decode"  # tile choice, see TILE_TABLE
    cache: str = ""  # fp32 | fp16 | bf16 | int8 (trt_contract.CACHE_COMBOS); "" = dtype's

    def __post_init__(self):
        from .reference import MASK_MODES

        if (self.dtype not in ("fp32", "fp16", "bf16") or self.phase not in ("decode", "prefill")
                or self.mask not in MASK_MODES):
            raise ValueError(f"unsupported attention variant {self}")
        check_cache(self.dtype, self.cache_dtype)

    @property
    def cache_dtype(self) -> str:
        return self.cache or self.dtype

    @property
    def tag(self) -> str:
        return attention_tag(self.dtype, self.head_dim, self.mask, self.phase, self.cache_dtype)


def aot_source(variant: AttentionVariant) -> dict:
    """Everything `triton.compile` and the launcher need for one variant (no GPU needed)."""
    block_d = max(16, next_pow2(variant.head_dim))
    cfg = tile_config(1 if variant.phase == "decode" else 64, block_d)
    ptr = f"*{variant.dtype}"
    cache = "*" + {"int8": "i8"}.get(variant.cache_dtype, variant.cache_dtype)
    signature = {"Q": ptr, "K_NEW": ptr, "V_NEW": ptr, "K_CACHE": cache, "V_CACHE": cache,
                 "PAST_LEN": "*i32", "NEW_LEN": "*i32", "K_SCALE": "*fp32", "V_SCALE": "*fp32",
                 **{name: "i32" for name in AOT_SCALARS},
                 "OUT": ptr, "K_OUT": cache, "V_OUT": cache}
    constexprs = {"CAUSAL": variant.mask == "causal", "HEAD_DIM": variant.head_dim,
                  "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": block_d}
    return dict(fn=_kv_attention_fwd, signature=signature, constexprs=constexprs,
                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                             enable_fp_fusion=True),
                grid=AOT_GRID, scalars=AOT_SCALARS, block_m=cfg.block_m)
