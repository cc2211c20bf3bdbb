"""Triton face of `arx::sample` (spec: reference.py). One program per output row.

Sorting a 152k vocabulary per step is what makes top-k/top-p expensive; this kernel never sorts.
Thresholds are found by bisection over the order-preserving int32 key of the fp32 values: 32
passes find the exact k-th largest value (top-k) and 32 more the exact top-p cut, each pass a
count or a softmax-mass sum over the row. Rows that disable a filter skip its passes, and greedy
rows need a single pass. The draw is Gumbel-max with Philox uniforms, so the sampled id is the
one the NumPy reference draws.

Layouts: logits (R, V), params (B, 5) f32, presence (B, V) bool, seed/offset/row (B,) i64,
ids (B,) i32; R = 2B when GUIDANCE (rows [0,B) cond, [B,2B) uncond). Program b reads row b of
every input; the Philox counter's last word is ROW[b] (an input), not b.
"""

from __future__ import annotations

from .._triton import require_triton
from ..trt_contract import SAMPLE_SCALARS

triton = require_triton()
import triton.language as tl  # noqa: E402  (after the friendly import check)

BLOCK_V = 1024
NUM_WARPS = 4


@triton.jit
def _key(x):
    """Order-preserving int64 key of fp32 values (for -inf < ... < +inf, no NaN)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _values(LOGITS, PRESENCE, b, B, V, start, penalty, cfg, temp, GUIDANCE: tl.constexpr,
            BLOCK_V: tl.constexpr):
    """Steps 1-4 of the spec for one tile: (BLOCK_V,) fp32, -inf past the vocab end."""
    i = start + tl.arange(0, BLOCK_V)
    ok = i < V
    row = b.to(tl.int64) * V
    x = tl.load(LOGITS + row + i, mask=ok, other=float("-inf")).to(tl.float32)
    if GUIDANCE:
        u = tl.load(LOGITS + (b + B).to(tl.int64) * V + i, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, u + cfg * (x - u), float("-inf"))
    seen = tl.load(PRESENCE + row + i, mask=ok, other=0) != 0
    x = tl.where(seen, tl.where(x < 0, x * penalty, x / penalty), x)
    return x / temp  # a division, like the reference (temperature, or 1 for greedy rows)


@triton.jit
def _count_or_mass(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, key_lo, thr_key, x_max,
                   MASS: tl.constexpr, GUIDANCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Sum over the row of [key(x) >= thr_key and key(x) >= key_lo] (MASS: exp(x - x_max))."""
    total = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = _values(LOGITS, PRESENCE, b, B, V, start, penalty, cfg, temp, GUIDANCE, BLOCK_V)
        k = _key(x)
        hit = (k >= thr_key) & (k >= key_lo) & (start + tl.arange(0, BLOCK_V) < V)
        if MASS:
            total += tl.where(hit, tl.math.exp(x - x_max), 0.0)
        else:
            total += hit.to(tl.float32)
    return tl.sum(total, 0)


@triton.jit
def _bisect(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, key_lo, key_hi, target, x_max,
            MASS: tl.constexpr, GUIDANCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Largest key K in [key_lo, key_hi) with count/mass(key >= K) >= target (32 halvings
    cover the whole int32 key range, so the result is exact)."""
    lo = key_lo
    hi = key_hi
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        got = _count_or_mass(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, key_lo, mid, x_max,
                             MASS, GUIDANCE, BLOCK_V)
        take = got >= target
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    return lo


@triton.jit
def _max_argmax(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, GUIDANCE: tl.constexpr,
                BLOCK_V: tl.constexpr):
    best = float("-inf")
    best_i = 0
    for start in range(0, V, BLOCK_V):
        x = _values(LOGITS, PRESENCE, b, B, V, start, penalty, cfg, temp, GUIDANCE, BLOCK_V)
        m, j = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        better = m > best  # strict: the earlier tile wins ties (lowest index, like np.argmax)
        best_i = tl.where(better, start + j, best_i)
        best = tl.where(better, m, best)
    return best, best_i


@triton.jit
def _sample_kernel(LOGITS, PARAMS, PRESENCE, SEED, OFFSET, ROW, B, V, IDS,
                   GUIDANCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """grid (B,). Argument order is TensorRT's AOT order: inputs, int32 scalars, outputs."""
    b = tl.program_id(0)
    p = PARAMS + b * 5  # columns: temperature, top_k, top_p, repetition_penalty, cfg_scale
    temperature = tl.load(p + 0)
    top_k = tl.load(p + 1).to(tl.int32)
    top_p = tl.load(p + 2)
    penalty = tl.load(p + 3)
    cfg = tl.load(p + 4)
    greedy = temperature <= 0.0
    temp = tl.where(greedy, 1.0, temperature)
    x_max, best_i = _max_argmax(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, GUIDANCE, BLOCK_V)
    if not greedy:
        key_lo = _key(tl.full((), float("-inf"), tl.float32))
        key_hi = _key(x_max) + 1
        if (top_k > 0) & (top_k < V):
            key_lo = _bisect(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, key_lo, key_hi,
                             top_k.to(tl.float32), x_max, False, GUIDANCE, BLOCK_V)
        if top_p < 1.0:
            z = _count_or_mass(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, key_lo, key_lo,
                               x_max, True, GUIDANCE, BLOCK_V)
            key_lo = _bisect(LOGITS, PRESENCE, b, B, V, penalty, cfg, temp, key_lo, key_hi,
                             top_p * z, x_max, True, GUIDANCE, BLOCK_V)
        best_i = _gumbel_argmax(LOGITS, PRESENCE, SEED, OFFSET, ROW, b, B, V, penalty, cfg,
                                temp, key_lo, GUIDANCE, BLOCK_V)
    tl.store(IDS + b, best_i.to(tl.int32))


@triton.jit
def _gumbel_argmax(LOGITS, PRESENCE, SEED, OFFSET, ROW, b, B, V, penalty, cfg, temp, key_lo,
                   GUIDANCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """argmax over kept tokens of x + Gumbel(Philox(seed, (i, offset_lo, offset_hi, row))))."""
    seed = tl.load(SEED + b)
    off = tl.load(OFFSET + b)
    off_lo = (off & 0xFFFFFFFF).to(tl.uint32)
    off_hi = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    row = (tl.load(ROW + b) & 0xFFFFFFFF).to(tl.uint32)  # the reference keeps the low 32 bits
    best = float("-inf")
    best_i = 0
    for start in range(0, V, BLOCK_V):
        i = start + tl.arange(0, BLOCK_V)
        x = _values(LOGITS, PRESENCE, b, B, V, start, penalty, cfg, temp, GUIDANCE, BLOCK_V)
        r0, _, _, _ = tl.philox(seed, i, off_lo + i.to(tl.uint32) * 0, off_hi,
                                row + i.to(tl.uint32) * 0)
        bits = r0.to(tl.int32, bitcast=True)
        u = tl.where(bits < 0, ~bits, bits) * 4.6566127342e-10  # tl.rand's uint -> [0, 1)
        score = tl.where((_key(x) >= key_lo) & (i < V), x - tl.log(-tl.log(u)), float("-inf"))
        m, j = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
        better = m > best
        best_i = tl.where(better, start + j, best_i)
        best = tl.where(better, m, best)
    return best_i


def sample(logits, params, presence, seed, offset, row=None, block_v: int = BLOCK_V):
    """Launch on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1); returns ids (B,) int32.
    row None: arange(B), each row's own index (the reference's default)."""
    import torch

    b, v = params.shape[0], logits.shape[1]
    if row is None:
        row = torch.arange(b, device=logits.device)
    if params.shape != (b, 5) or logits.shape[0] not in (b, 2 * b):
        raise ValueError(f"need params (B, 5) and logits (B or 2B, V); got {tuple(params.shape)}"
                         f" and {tuple(logits.shape)}")
    if presence.shape != (b, v) or any(t.shape != (b,) for t in (seed, offset, row)):
        raise ValueError("need presence (B, V), seed (B,), offset (B,), row (B,)")
    ids = torch.empty(b, dtype=torch.int32, device=logits.device)
    # fp fusion off: an FMA in the guidance mix would round differently from the reference
    _sample_kernel[(b,)](logits.contiguous(), params.to(torch.float32).contiguous(),
                         presence.to(torch.bool).contiguous(), seed.to(torch.int64),
                         offset.to(torch.int64), row.to(torch.int64), b, v, ids,
                         GUIDANCE=logits.shape[0] == 2 * b, BLOCK_V=block_v,
                         num_warps=NUM_WARPS, enable_fp_fusion=False)
    return ids


# ------------------------------------------------------------------ ahead-of-time variants
AOT_SCALARS = SAMPLE_SCALARS  # trt_contract's: the kit's AOT launch passes the same
AOT_GRID = ("B", "1", "1")


def aot_source(dtype: str = "fp16", guidance: bool = False) -> dict:
    """Everything `triton.compile` and the launcher need for one sampler variant."""
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unsupported logits dtype {dtype!r}")
    signature = {"LOGITS": f"*{dtype}", "PARAMS": "*fp32", "PRESENCE": "*i1", "SEED": "*i64",
                 "OFFSET": "*i64", "ROW": "*i64", "B": "i32", "V": "i32", "IDS": "*i32"}
    return dict(fn=_sample_kernel, signature=signature,
                constexprs={"GUIDANCE": bool(guidance), "BLOCK_V": BLOCK_V},
                options=dict(num_warps=NUM_WARPS, num_stages=1, enable_fp_fusion=False),
                grid=AOT_GRID, scalars=AOT_SCALARS)
