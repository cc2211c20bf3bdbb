"""Speculative Jacobi decoding (SJD) of image tokens: speculation without a draft model.

Image-token models draw from flat distributions (top-k in the thousands), so a draft model or
a lookup rarely guesses the next code; Jacobi iteration guesses a window of them instead and
refines the guesses with the target itself (Teng et al. 2024, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding").

    prefill  class tokens (cond rows, then null rows) ─► token 0, as runtime/image_generate.py
    round    per image b, c_b tokens committed, the last not yet in the cache:
             step [last_b, d_0 .. d_{L-1}] (cond and null rows alike, logits at every position)
             p_i  the guided distribution of token c_b + i (arx::sample's, its CFG scale)
             d_i  judged in order by the rejection rule against q_i, the distribution it was
                  drawn from: kept with probability min(1, p_i(d_i) / q_i(d_i)); the first
                  rejected one is replaced by a draw from norm(max(p_i - q_i, 0)); all kept:
                  a bonus token from p_L
             the guesses after the first rejection are drawn again from their new p_j (the
             Jacobi refinement, q_j = p_j), the window is refilled with draws from the last p,
             and the rows b and B + b roll back to the committed tokens

Greedy: a guess is kept while it equals the guided argmax (Jacobi decoding): the grid is token
for token generate_images'. Sampling: the rule holds for any proposal whose distribution is
known, so every token follows p exactly, as without speculation (the quality cost is nil; the
test measures the token histograms); a seed reproduces the run, but the draws differ from
plain sampling's. Randomness is Philox by position, as in runtime/speculative.py: the accept
test and the residual use its streams, guesses a third stream that also counts the round.

`relax` (runtime/relaxed_acceptance.py, LANTERN) judges each guess against the guided
distribution with its nearest codes' mass moved onto it: more guesses kept, tokens no longer
exactly from p (opt-in; greedy grids then differ from plain greedy too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from arx.errors import ArxError
from arx.runtime.image_generate import (ImageOptions, ImageResult, _choose, _codebook,
                                        check_classes, image_info)
from arx.runtime.sampler import Sampler, resolve_seed
from arx.runtime.speculative import (SpeculationStats, accept_uniforms, gumbel_draw,
                                     gumbel_draws, judge)

GUESS_STREAM = 1 << 60  # Philox offsets of the guesses: position | round << 32 | stream
DEFAULT_WINDOW = 8
METHOD = "jacobi"


@dataclass
class JacobiStats(SpeculationStats):
    relaxed: dict | None = None  # Relaxation.to_json() where --relax judged the guesses

    def to_json(self) -> dict:
        return {**super().to_json(), "relaxed": self.relaxed}


@dataclass
class JacobiResult(ImageResult):
    speculation: JacobiStats = field(default_factory=lambda: JacobiStats(METHOD))


def parse_jacobi(text: str | None) -> int | None:
    """--speculate of an image bundle: "jacobi" or "jacobi:W" (W guesses per image and step)
    -> the window; None when not given."""
    if text is None:
        return None
    name, _, width = text.strip().lower().partition(":")
    if name != METHOD:
        raise ArxError(f"image-token bundles speculate with --speculate jacobi[:W] (no draft "
                       f"model needed), got {text!r}")
    try:
        window = int(width) if width else DEFAULT_WINDOW
    except ValueError:
        raise ArxError(f"--speculate jacobi:W takes a number of guesses, got {width!r}") from None
    if window < 1:
        raise ArxError(f"--speculate jacobi:W needs W >= 1 (got {window})")
    return window


def generate_images_jacobi(session, classes: list[int], options: ImageOptions,
                           window: int = DEFAULT_WINDOW, relax=None) -> JacobiResult:
    """generate_images with up to `window` guessed tokens verified per image and step;
    `relax` a relaxed_acceptance.Relaxation (None: the exact rule)."""
    if not session.ragged:
        raise ArxError("Jacobi speculation rolls rows back separately, which this bundle's cache "
                       "(grown by concatenation) cannot; drop --speculate")
    info = image_info(session.manifest)
    check_classes(info, classes)
    b, n = len(classes), info.tokens
    base = resolve_seed(options.sampling.seed) if options.sampling.do_sample else None
    seeds = [None if base is None else base + i for i in range(b)]
    ids = np.array(classes + [info.null_class] * (b if options.guided else 0), np.int64)
    out = np.zeros((b, n), np.int64)
    result = JacobiResult(out.reshape(b, *info.grid), list(classes), seeds)
    result.speculation.relaxed = None if relax is None else relax.to_json()
    # the class token + every token but the last, and room for a step's padding if it fits
    cache = session.new_cache(len(ids), min(n + window, session.capacity.max_seq_len))
    try:
        t0 = time.perf_counter()
        logits = session.step(cache, (ids + info.class_offset)[:, None],
                              np.ones(len(ids), np.int64), logits="last")  # (rows, 1, V)
        first = _codebook(logits[:, 0], info)  # (rows, codebook)
        out[:, 0] = _choose(first, 0, n, seeds, options, b)
        result.first_token_s = time.perf_counter() - t0
        _Rounds(session, cache, options, seeds, out, window, result, info, relax).run(first)
        result.tokens_s = time.perf_counter() - t0
    finally:
        cache.close()
    return result


class _Rounds:
    """The loop's state: committed counts, each image's guesses and their distributions."""

    def __init__(self, session, cache, options, seeds, out, window, result, info, relax):
        self.session, self.cache, self.options, self.seeds = session, cache, options, seeds
        self.relax = relax
        self.info = info  # the codebook's columns and input ids, where text shares the vocabulary
        self.out, self.window, self.result = out, window, result
        self.images, self.n = out.shape
        self.count = np.ones(self.images, np.int64)  # tokens committed per image
        self.guesses: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(self.images)]
        self.round = 0

    def run(self, first_logits: np.ndarray) -> None:
        """first_logits (rows, codebook): the prefill's, token 0 already drawn from them."""
        for i in range(self.images):  # the first guesses: draws from token 0's distribution
            ks = np.arange(1, min(1 + self.window, self.n))
            dists = np.repeat(self._window_probs(first_logits[:, None], i, 0), len(ks), axis=0)
            self.guesses[i] = list(zip(self._guess(dists, i, ks).tolist(), dists))
        while (self.count < self.n).any():
            self.round += 1  # round 0 made the first guesses: each round draws new ones
            t = time.perf_counter()
            self._step()
            self.result.step_s.append(time.perf_counter() - t)

    def _step(self) -> None:
        live = self.count < self.n
        # guesses for tokens count .. count + L - 1; the last token is never fed back
        # a step writes its whole width (padding too) into every row: it must fit the longest
        room = self.cache.max_seq_len - int(self.cache.lengths.max()) - 1
        lens = np.where(live, np.minimum(min(self.window, room), self.n - 1 - self.count), 0)
        width = np.where(live, 1 + lens, 0)
        feed = np.zeros((self.images, int(width.max())), np.int64)
        for i in np.flatnonzero(live):
            feed[i, 0] = self.out[i, self.count[i] - 1]
            feed[i, 1: width[i]] = [g for g, _ in self.guesses[i][: lens[i]]]
        rows = self.cache.lengths.shape[0] // self.images
        base = self.cache.lengths.copy()
        feed += self.info.codebook_offset  # codes -> the model's input ids
        logits = self.session.step(self.cache, np.tile(feed, (rows, 1)), np.tile(width, rows),
                                   logits="all")  # (rows, W, V)
        kept = np.zeros(self.images, np.int64)
        for i in np.flatnonzero(live):
            kept[i] = self._judge(i, logits, int(lens[i]))
        self.cache.rollback(np.where(np.tile(live, rows), base + 1 + np.tile(kept, rows), base))
        stats = self.result.speculation
        stats.target_steps += 1
        stats.row_steps += int(live.sum())
        stats.proposing_steps += int((lens > 0).sum())
        stats.proposed += int(lens.sum())
        stats.accepted += int(kept.sum())
        stats.produced += int((kept + 1)[live].sum())

    def _judge(self, i: int, logits: np.ndarray, lens: int) -> int:
        """Image i's guesses against the step's logits: commit the kept ones and the token
        after them, refine the rest; -> how many guesses were kept."""
        c = int(self.count[i])
        p = self._window_probs(logits[:, : lens + 1], i, c)
        kept, token = self._first_rejection(i, p, c, lens)
        if token is None:  # every guess kept: the bonus token of the last position
            token = self._draw(p[lens], i, c + lens)
        self.out[i, c + kept] = token
        self.count[i] = c + kept + 1
        # Jacobi: the guesses after the rejection are redrawn from their new p (q = p), then
        # the window is topped up with draws from the newest distribution (neighbouring codes
        # are alike, so it guesses better than uniform draws would)
        top = min(c + kept + 1 + self.window, self.n)
        ks = np.arange(c + kept + 1, top)
        dists = p[np.minimum(ks - c, lens)]
        self.guesses[i] = list(zip(self._guess(dists, i, ks).tolist(), dists))
        return kept

    def _first_rejection(self, i: int, p: np.ndarray, c: int, lens: int):
        """Judge image i's guesses for tokens c.. in order, committing the kept ones;
        -> (guesses kept, the replacement token of the first rejected one | None)."""
        seed, guesses = self.seeds[i], self.guesses[i][:lens]
        pos = 1 + c + np.arange(lens)  # the sampler's offsets of tokens c.. (their positions)
        u = None if seed is None else accept_uniforms(seed, pos, np.zeros(lens, np.int64))
        for j, (guess, q) in enumerate(guesses):
            target = p[j] if self.relax is None else self.relax.target(p[j], guess)
            if seed is None:
                best = int(target.argmax())
                verdict = -1 if guess == best else best
            else:
                verdict = judge(target, q, guess, u[j], seed, int(pos[j]), 0)
            if verdict >= 0:
                return j, verdict
            self.out[i, c + j] = guess
        return lens, None

    def _window_probs(self, logits: np.ndarray, i: int, c: int) -> np.ndarray:
        """(L, codebook) the guided distributions of image i's tokens c .. c + L - 1 from the
        step's logits (rows, L, V): one sampler pass over the window where the scale is the
        same for every token, else one per token (the linear schedule)."""
        opts = self.options
        halves = [_codebook(logits[r], self.info)  # cond, then null: (L, codebook) each
                  for r in ([i, self.images + i] if opts.guided else [i])]

        def probs(cols: slice, k: int) -> np.ndarray:
            sampling = replace(opts.sampling, cfg_scale=opts.scale_at(k, self.n),
                               seed=self.seeds[i])
            stacked = np.concatenate([h[cols] for h in halves])
            return Sampler(sampling, stacked.shape[-1]).probs(stacked, None,
                                                              rows=len(halves[0][cols]))

        if opts.cfg_schedule == "linear":
            return np.concatenate([probs(slice(j, j + 1), c + j) for j in range(logits.shape[1])])
        return probs(slice(None), c)

    def _draw(self, p: np.ndarray, i: int, k: int) -> int:
        """Token k of image i from p as plain sampling draws it (offset 1 + k); greedy: argmax."""
        seed = self.seeds[i]
        return int(p.argmax()) if seed is None else gumbel_draw(p, seed, 1 + k, 0)

    def _guess(self, dists: np.ndarray, i: int, ks: np.ndarray) -> np.ndarray:
        """Guesses for image i's tokens ks from dists (N, V), on the guess stream of this
        round (a token is guessed again in later rounds: new draws); greedy: argmax."""
        seed = self.seeds[i]
        if seed is None or not len(ks):
            return dists.argmax(axis=1) if len(ks) else np.zeros(0, np.int64)
        return gumbel_draws(dists, seed, (1 + ks) | (self.round << 32) | GUESS_STREAM, 0)
