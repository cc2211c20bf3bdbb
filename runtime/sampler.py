"""Token selection from logits on the host (numpy): greedy, temperature, top-k, top-p,
repetition penalty, seeded. The order and semantics follow Hugging Face's logits processors
(repetition penalty, then temperature, top-k, top-p), so `--greedy` matches `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from arx.errors import ArxError


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None

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


class Sampler:
    def __init__(self, options: SamplingOptions, vocab_size: int):
        self.options = options
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """logits (B, V) float; seen (B, V) bool: tokens already in each sequence. -> (B,) int64."""
        o = self.options
        scores = np.asarray(logits, dtype=np.float32)  # no copy: every change below makes a new array
        if o.repetition_penalty != 1.0 and seen is not None:
            penalized = np.where(scores < 0, scores * o.repetition_penalty, scores / o.repetition_penalty)
            scores = np.where(seen, penalized, scores)
        if not o.do_sample:
            return scores.argmax(axis=-1).astype(np.int64)
        scores = scores / o.temperature
        if o.top_k and o.top_k < scores.shape[-1]:
            kth = np.partition(scores, -o.top_k, axis=-1)[:, -o.top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = _softmax(scores)
        if o.top_p < 1.0:
            probs = _top_p(probs, o.top_p)
        return _draw(probs, self.rng)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = mass_before < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)
