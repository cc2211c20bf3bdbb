"""NumPy reference of `arx::sample`: this file is the op's specification.

Inputs (R = B, or R = 2B with classifier-free guidance):
    logits   (R, V) fp32/fp16/bf16   with guidance rows [0, B) are conditional and [B, 2B) the
                                     unconditional twins (the `torch.cat([cond, uncond])` batch
                                     of LlamaGen-style image-token models)
    params   (B, 5) float32          per-row settings, columns in PARAM_COLUMNS order
    presence (B, V) bool             tokens seen so far: they get the repetition penalty
    seed     (B,) int64              Philox key per row
    offset   (B,) int64              Philox counter per row; the runtime bumps it every step
    row      (B,) int64              Philox row term per row (default arange(B): row b is b)
Output:
    ids      (B,) int32

Per row b, all in float32, in this order (Hugging Face's processor order):
  1. guidance:   x = u + cfg_scale * (c - u)                (only when R == 2B)
  2. repetition: where presence, x = x * penalty if x < 0 else x / penalty   (HF's rule)
  3. temperature <= 0: ids[b] = argmax(x) (lowest index on ties) -- greedy; stop here
  4. x = x / temperature
  5. top_k in (0, V): keep x >= the k-th largest x (ties at the threshold are kept)
  6. top_p in (0, 1): over the kept set, keep x >= t where t is the largest kept value with
     sum(softmax(kept)[x >= t]) >= top_p (the smallest head of the distribution with mass >=
     top_p; HF's rule, at least one token always kept)
  7. ids[b] = argmax over kept i of x_i + g_i (Gumbel-max: an exact draw from softmax(x) over
     the kept set), g_i = -log(-log(u_i)), u_i = philox_uniform(seed[b], offset[b], row[b], i).

The random numbers are Philox-4x32-10 (Triton's `tl.philox`, the generator behind `tl.rand`)
with key = seed and counter = (i, offset_lo, offset_hi, row[b]), converted to [0, 1) like
`tl.rand`; `philox_uniform` reproduces it bit for bit, so both faces draw the same ids.

The row term is an input, not the row's index, because the caller decides what a draw may
depend on: rows of one seed in one batch need distinct terms (arange, the default) or they
would draw the same noise, while a loop whose outputs must not depend on the batch they share
(the image loop: each image as row 0 with seed + i; a serving slot) passes zeros, so a device
batch draws exactly what the host draws one row at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Column order of the `params` input (a table, shared by every face).
PARAM_COLUMNS = ("temperature", "top_k", "top_p", "repetition_penalty", "cfg_scale")
COL = {name: i for i, name in enumerate(PARAM_COLUMNS)}


@dataclass(frozen=True)
class SamplingParams:
    """One row of `params`. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    cfg_scale: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, "
                             f"got {self}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def row(self) -> np.ndarray:
        return np.array([getattr(self, c) for c in PARAM_COLUMNS], np.float32)

    @staticmethod
    def table(rows) -> np.ndarray:
        """(B, 5) float32 `params` from a list of SamplingParams."""
        return np.stack([r.row() for r in rows])


def presence_mask(tokens, lengths, vocab: int) -> np.ndarray:
    """(B, V) bool from previous token ids (B, T) of which the first lengths[b] are valid."""
    tokens = np.asarray(tokens)
    mask = np.zeros((tokens.shape[0], vocab), bool)
    for b, n in enumerate(np.asarray(lengths)):
        mask[b, tokens[b, :n]] = True
    return mask


# ------------------------------------------------------------------------- Philox (tl.philox)
_KEY_A, _KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)


def _mulhilo(a: np.uint64, x: np.ndarray):
    prod = a * x.astype(np.uint64)
    return (prod >> np.uint64(32)).astype(np.uint32), (prod & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10) -> np.ndarray:
    """First output word of Philox-4x32 for key `seed` (int64 split lo/hi), like tl.philox."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    c = [np.asarray(x).astype(np.int64).astype(np.uint32) for x in np.broadcast_arrays(c0, c1, c2, c3)]
    with np.errstate(over="ignore"):
        for _ in range(rounds):
            hi_b, lo_b = _mulhilo(_ROUND_B, c[2])
            hi_a, lo_a = _mulhilo(_ROUND_A, c[0])
            c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
            k0, k1 = k0 + _KEY_A, k1 + _KEY_B
    return c[0]


def uint_to_uniform(x: np.ndarray) -> np.ndarray:
    """tl.rand's conversion of a uint32 to float32 in [0, 1)."""
    i = x.view(np.int32)
    i = np.where(i < 0, ~i, i)
    return (i.astype(np.float32) * np.float32(4.6566127342e-10)).astype(np.float32)


def philox_uniform(seed: int, offset: int, row: int, vocab: int) -> np.ndarray:
    """(V,) float32 uniforms of row `row`: counter = (i, offset_lo, offset_hi, row)."""
    offset = int(offset) & 0xFFFFFFFFFFFFFFFF
    i = np.arange(vocab, dtype=np.int64)
    return uint_to_uniform(philox4x32(seed, i, offset & 0xFFFFFFFF, offset >> 32, row))


# ---------------------------------------------------------------------------- the pipeline
def processed_logits(logits, params, presence) -> np.ndarray:
    """Steps 1-2: (B, V) float32 after guidance and repetition penalty."""
    b = params.shape[0]
    x = np.asarray(logits, np.float32)
    if x.shape[0] == 2 * b:
        cond, uncond = x[:b], x[b:]
        x = uncond + params[:, COL["cfg_scale"], None] * (cond - uncond)
    elif x.shape[0] != b:
        raise ValueError(f"logits has {x.shape[0]} rows; params says B={b}: need B or 2B rows")
    pen = params[:, COL["repetition_penalty"], None].astype(np.float32)
    penalized = np.where(x < 0, x * pen, x / pen).astype(np.float32)
    return np.where(presence, penalized, x).astype(np.float32)


def kept_threshold(x: np.ndarray, top_k: int, top_p: float) -> np.float32:
    """Steps 5-6 for one row of temperature-scaled x: tokens with x >= the result are kept."""
    desc = np.sort(x)[::-1]
    thr = desc[-1]
    if 0 < top_k < x.size:
        thr = desc[top_k - 1]
    if top_p < 1.0:
        kept = x[x >= thr]
        weights = np.exp(kept - kept.max()).astype(np.float32)
        values = np.unique(kept)[::-1]  # distinct kept values, descending
        mass = np.array([weights[kept >= v].sum(dtype=np.float32) for v in values], np.float32)
        target = np.float32(top_p) * weights.sum(dtype=np.float32)
        thr = values[int(np.argmax(mass >= target))]
    return np.float32(thr)


def sample_reference(logits, params, presence, seed, offset, row=None) -> np.ndarray:
    """ids (B,) int32 following steps 1-7 of the module docstring (row None: arange(B))."""
    params = np.asarray(params, np.float32)
    x = processed_logits(logits, params, presence)
    ids = np.zeros(params.shape[0], np.int32)
    row = np.arange(params.shape[0]) if row is None else np.asarray(row, np.int64)
    for b in range(params.shape[0]):
        temperature, top_k, top_p = params[b, 0], int(params[b, 1]), float(params[b, 2])
        if temperature <= 0:
            ids[b] = int(np.argmax(x[b]))
            continue
        xb = (x[b] / temperature).astype(np.float32)
        keep = xb >= kept_threshold(xb, top_k, top_p)
        u = philox_uniform(int(seed[b]), int(offset[b]), int(row[b]), xb.size)
        with np.errstate(divide="ignore"):
            gumbel = -np.log(-np.log(u))
        ids[b] = int(np.argmax(np.where(keep, xb + gumbel, -np.inf)))
    return ids
