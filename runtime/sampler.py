"""Token selection on the host: the NumPy face of `arx::sample`, so ONNX Runtime and a TensorRT
engine pick the same tokens for the same seed.

The specification is `arx.plugins.sampling.reference` (guidance, repetition penalty, greedy,
temperature, top-k, top-p in Hugging Face's order, then a Gumbel-max draw from Philox uniforms
keyed by the seed and counted by an offset). This module computes the same thing vectorised
over the vocabulary (the reference's top-p loops over distinct values, O(V^2)); a test pins the
two against each other. The semantics of the filters are Hugging Face's (tested against its
logits processors), so `--greedy` matches `generate` and the kept set matches HF's warpers.

Offsets count positions, not steps: the token that will sit at position p of row b is drawn
with offset p. A prefill that samples after a prompt of n tokens uses offset n, each decode
step the row's length; a speculative verify step that samples several positions at once (or a
rolled-back step that is redone) uses the same offsets a one-token loop would have used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from arx.errors import ArxError
from arx.plugins.sampling.reference import (COL, SamplingParams, philox4x32, processed_logits,
                                            uint_to_uniform)


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # None: a fresh random seed per Sampler
    cfg_scale: float = 1.0  # guidance of 2B logit rows (cond, then uncond); 1: cond as it is

    def __post_init__(self):
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ArxError(f"--temperature must be > 0 (got {self.temperature}); use --greedy for "
                           f"deterministic output")
        if self.top_k < 0:
            raise ArxError(f"--top-k must be >= 0 (got {self.top_k}); 0 turns it off")
        if not 0 < self.top_p <= 1:
            raise ArxError(f"--top-p must be in (0, 1] (got {self.top_p}); 1 turns it off")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise ArxError(f"--repetition-penalty must be > 0 (got {self.repetition_penalty}); "
                           f"1 turns it off")
        if self.seed is not None and self.seed < 0:
            raise ArxError(f"--seed must be >= 0 (got {self.seed})")
        if not (self.cfg_scale >= 0 and np.isfinite(self.cfg_scale)):
            raise ArxError(f"--cfg must be >= 0 (got {self.cfg_scale}); 1 turns guidance off")

    def params(self) -> SamplingParams:
        """One row of arx::sample's `params` (temperature 0 = greedy, the plugin's rule)."""
        return SamplingParams(temperature=self.temperature if self.do_sample else 0.0,
                              top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty,
                              cfg_scale=self.cfg_scale)


def resolve_seed(seed: int | None) -> int:
    """The seed a generation uses: the given one, or a fresh random 62-bit one."""
    return int(seed) if seed is not None else int(np.random.SeedSequence().entropy % (1 << 62))


class Sampler:
    """arx::sample on the host for rows that share one SamplingOptions and one seed."""

    def __init__(self, options: SamplingOptions, vocab_size: int):
        self.options = options
        self.vocab_size = vocab_size
        self.seed = resolve_seed(options.seed)
        self._row = options.params().row()

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None, offsets: np.ndarray,
                 rows: np.ndarray | None = None) -> np.ndarray:
        """logits (B, V) (or (2B, V): conditional rows then unconditional ones, mixed by the
        guidance scale); seen (B, V) bool tokens already in each row (None: no penalty);
        offsets (B,) int64 position of the token being drawn; rows (B,) int64 the Philox row
        term of each (arx::sample's `row`; None: arange(B)). -> (B,) int64."""
        offsets = np.asarray(offsets, np.int64)
        x = self._processed(logits, seen, offsets.shape[0])
        if not self.options.do_sample:
            return x.argmax(axis=-1).astype(np.int64)
        ids = np.empty(offsets.shape[0], np.int64)
        rows = np.arange(offsets.shape[0]) if rows is None else rows
        u = uniforms(self.seed, offsets, rows, x.shape[-1])  # (B, V)
        with np.errstate(divide="ignore"):
            gumbel = -np.log(-np.log(u))
        for b in range(offsets.shape[0]):
            xb, keep = self._filtered(x[b])
            ids[b] = int(np.argmax(np.where(keep, xb + gumbel[b], -np.inf)))
        return ids

    def probs(self, logits: np.ndarray, seen: np.ndarray | None,
              rows: int | None = None) -> np.ndarray:
        """(R, V) float64: the distribution __call__ draws each row from (softmax of the
        temperature-scaled row over the tokens top-k/top-p keep; greedy: one-hot at the
        argmax). What speculative sampling's rejection rule compares (runtime/speculative.py).
        rows: R, when logits are (2R, V) conditional and unconditional rows to be guided."""
        x = self._processed(logits, seen, logits.shape[0] if rows is None else rows)
        out = np.zeros(x.shape, np.float64)
        if not self.options.do_sample:
            out[np.arange(x.shape[0]), x.argmax(axis=-1)] = 1.0
            return out
        for b in range(x.shape[0]):
            xb, keep = self._filtered(x[b])
            w = np.where(keep, np.exp(xb.astype(np.float64) - float(xb[keep].max())), 0.0)
            out[b] = w / w.sum()
        return out

    def _processed(self, logits: np.ndarray, seen: np.ndarray | None, rows: int) -> np.ndarray:
        """Guidance and repetition penalty (the reference's steps 1-2) -> (rows, V) float32."""
        if logits.shape[0] == rows and (seen is None or self.options.repetition_penalty == 1.0):
            return np.asarray(logits, np.float32)  # both steps are the identity: skip the passes
        presence = seen if seen is not None else np.zeros((rows, logits.shape[-1]), bool)
        return processed_logits(logits, np.tile(self._row, (rows, 1)), presence)

    def _filtered(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Steps 4-6 on one row: the temperature-scaled row (V,) and the kept mask (V,)."""
        o = self.options
        xb = (x / np.float32(self._row[COL["temperature"]])).astype(np.float32)
        return xb, xb >= kept_threshold(xb, o.top_k, o.top_p)


def uniforms(seed: int, offsets: np.ndarray, rows: np.ndarray, vocab: int) -> np.ndarray:
    """(R, V) float32: the reference's philox_uniform(seed, offsets[r], rows[r], vocab) for
    every r in one vectorised Philox call (counter = (i, offset_lo, offset_hi, row))."""
    off = np.asarray(offsets, np.int64).astype(np.uint64)[:, None]  # offsets < 2^63
    i = np.arange(vocab, dtype=np.int64)[None, :]
    return uint_to_uniform(philox4x32(seed, i, off & np.uint64(0xFFFFFFFF), off >> np.uint64(32),
                                      np.asarray(rows, np.int64)[:, None]))


def kept_threshold(x: np.ndarray, top_k: int, top_p: float) -> np.float32:
    """Tokens of the temperature-scaled row x (V,) with x >= the result survive top-k, then
    top-p: the reference's steps 5-6 with one sort instead of a loop over distinct values."""
    v = x.size
    thr = x.min()
    if 0 < top_k < v:
        thr = np.partition(x, v - top_k)[v - top_k]  # the k-th largest; ties at it are kept
    if top_p < 1.0:
        kept = np.sort(x[x >= thr])[::-1]
        weights = np.exp(kept - kept[0]).astype(np.float32)
        target = np.float32(top_p) * weights.sum(dtype=np.float32)
        # the first position whose running mass reaches the target; a tie run containing it
        # is kept whole by the >= comparison, as in the reference
        reached = np.cumsum(weights, dtype=np.float64) >= target
        thr = kept[int(np.argmax(reached)) if reached.any() else kept.size - 1]
    return np.float32(thr)
