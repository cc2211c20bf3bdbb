"""Speculative decoding: a loop policy over the step API of runtime/generate.py.

    prefill ─► per round:  proposer.propose ─► k_b tokens per row (draft bundle | lookup)
                           target.step([last, d_1..d_k], logits="all")     one ragged verify step
                           accept per row (below) ─► a_b accepted + 1 token of the target's
                           target cache and proposer roll back to the committed text, per row

Acceptance, per row, at the positions the tokens will hold:
  greedy    d_i is kept while it equals the target's own choice there (arx::sample with
            temperature 0, repetition penalty included): the output is token for token the
            target's plain greedy decoding;
  sampling  the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023). Naming here,
            as in Chen et al. and gpt-fast: q = the TARGET's filtered distribution, p = the
            DRAFT's (what d_i was drawn from; a point mass for a lookup proposal). Leviathan
            et al. and Hugging Face's _speculative_sampling name them the other way round.
            d_i is kept when u_i * p(d_i) < q(d_i), u_i uniform; at the first rejection the
            token is drawn from norm(max(q - p, 0));
            when all k are kept a bonus token is drawn from the target's next row. Each
            emitted token then follows q exactly (docs/design.md, "Speculative decoding").

Randomness is arx::sample's Philox with the generation's seed, counted by position: draft and
bonus tokens use the sampler itself (offset = position); the accept test and the residual draw
use the same counter with a stream tag in its top bits, so no two uses share a draw and a
seed reproduces the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from arx.errors import ArxError
from arx.runtime.generate import (GenerateOptions, GenerationResult, TokenCallback, TokenSteps,
                                  check_prompts, record_tokens, seen_tokens)
from arx.runtime.engine_session import VERIFY_IDS
from arx.runtime.proposers import Proposal
from arx.runtime.sampler import Sampler, uniforms

ACCEPT_STREAM, RESIDUAL_STREAM = 1 << 61, 1 << 62  # Philox offsets = position | stream


@dataclass(frozen=True)
class SpeculativeOptions:
    k: int = 4  # tokens proposed per row and step (the start when adaptive)
    # HF's rule per row: +2 after a step that kept all, else -1; at 0 the row makes plain steps
    # for `cooldown` steps, then tries k = 1 again (a draft that never agrees costs little)
    adaptive: bool = False
    max_k: int = 16  # adaptive k stays in 0..max_k
    cooldown: int = 8

    def __post_init__(self):
        if self.k < 1 or self.max_k < self.k:
            raise ArxError(f"--speculate takes a number of tokens >= 1 or 'auto', got {self.k}")

    @staticmethod
    def parse(text: str | None) -> "SpeculativeOptions":
        """--speculate K|auto (default auto: start at 4, adapt)."""
        if text is None or text.strip().lower() == "auto":
            return SpeculativeOptions(adaptive=True)
        try:
            k = int(text)
        except ValueError:
            raise ArxError(f"--speculate takes a number of tokens or 'auto', "
                           f"got {text!r}") from None
        return SpeculativeOptions(k=k, max_k=max(k, SpeculativeOptions.max_k))


def from_flags(draft, lookup, speculate) -> SpeculativeOptions | None:
    """--draft BUNDLE / --lookup N / --speculate K|auto of arx generate and arx profile,
    checked before anything loads; None when no speculation is asked for."""
    if draft is None and lookup is None:
        if speculate is not None:
            raise ArxError("--speculate needs a proposer: --draft BUNDLE or --lookup N")
        return None
    if draft is not None and lookup is not None:
        raise ArxError("speculation takes one proposer: --draft BUNDLE or --lookup N, not both")
    if lookup is not None and lookup < 1:
        raise ArxError(f"--lookup takes the longest n-gram to match, >= 1 (got {lookup})")
    return SpeculativeOptions.parse(speculate)


@dataclass
class SpeculationStats:
    method: str  # "draft" | "lookup"
    proposed: int = 0  # tokens proposed to the target
    accepted: int = 0  # of those, kept
    row_steps: int = 0  # (row, verify step) pairs of unfinished rows
    proposing_steps: int = 0  # of those, with at least one proposal
    produced: int = 0  # tokens those row steps emitted
    target_steps: int = 0  # verify steps of the whole batch
    draft_s: float = 0.0  # time proposing
    verify_s: float = 0.0  # time in verify steps and acceptance

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Proposals kept per row step that had any."""
        return self.accepted / self.proposing_steps if self.proposing_steps else 0.0

    @property
    def tokens_per_target_step(self) -> float:
        """Tokens per row and target step after the prefill (plain decoding: 1)."""
        return self.produced / self.row_steps if self.row_steps else 0.0

    def to_json(self) -> dict:
        return {"method": self.method, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "mean_accepted": self.mean_accepted,
                "tokens_per_target_step": self.tokens_per_target_step,
                "target_steps": self.target_steps, "draft_s": self.draft_s,
                "verify_s": self.verify_s}


@dataclass
class SpeculativeResult(GenerationResult):
    speculation: SpeculationStats = field(default_factory=lambda: SpeculationStats("none"))


def generate_speculative(session, proposer, prompts: list[list[int]], options: GenerateOptions,
                         spec: SpeculativeOptions = SpeculativeOptions(),
                         on_token: TokenCallback | None = None) -> SpeculativeResult:
    """generate() with proposals verified k + 1 at a time; the same tokens (greedy) or the same
    distribution (sampling) as generate(session, prompts, options)."""
    options = check_prompts(session.manifest, session.capacity, prompts, options)
    _check_target(session, options.sampling)
    batch, plens = len(prompts), np.array([len(p) for p in prompts], np.int64)
    longest = int(plens.max()) + options.max_new_tokens  # the longest text a row reaches
    seen = (seen_tokens(prompts, session.manifest.vocab_size)
            if options.sampling.repetition_penalty != 1.0 else None)
    if hasattr(proposer, "check_room"):
        proposer.check_room(longest + 1)
    steps = TokenSteps(session, batch, min(longest + spec.max_k + 1, session.capacity.max_seq_len),
                       options.sampling, seen)
    result = SpeculativeResult([[] for _ in prompts], ["length"] * batch, plens.tolist(),
                               speculation=SpeculationStats(proposer.method))
    text = np.zeros((batch, longest), np.int64)  # (B, T) each row's prompt + committed tokens
    for b, p in enumerate(prompts):
        text[b, : len(p)] = p
    loop = _Loop(session, steps, proposer, options, spec, result, text, plens.copy(), seen,
                 on_token)
    try:
        # the draft lags by up to cooldown + 2 tokens and runs k - 1 past the text
        proposer.start(batch, longest + spec.max_k + spec.cooldown + 3, steps.sampling)
        loop.run(plens)
    finally:
        steps.close()
        proposer.close()
    return result


def _check_target(session, sampling) -> None:
    if hasattr(session, "step_tokens") and "logits" not in session.outputs:  # an engine
        if _device_verify(session, sampling):
            return
        if VERIFY_IDS in session.outputs:
            raise ArxError("this engine verifies greedy proposals only (arx build --logits "
                           "verify): use --greedy without --repetition-penalty, or rebuild it "
                           "with --logits all for sampled speculation")
        raise ArxError("this engine returns only each row's last logits; verifying speculated "
                       "tokens needs every position: rebuild it with arx build --logits all "
                       "(and --decode-tokens K+1 for a verify profile), or drop --engine")
    if not session.ragged:
        raise ArxError("speculation rolls rows back separately, which this bundle's cache "
                       "(grown by concatenation: a custom-protocol export) cannot; run without "
                       "--draft/--lookup")


class _Loop:
    """One speculative generation's state: the committed text, the per-row k, the results."""

    def __init__(self, session, steps, proposer, options, spec, result, text, lengths, seen,
                 on_token):
        self.session, self.steps, self.proposer = session, steps, proposer
        self.options, self.spec, self.result = options, spec, result
        self.text, self.lengths, self.seen, self.on_token = text, lengths, seen, on_token
        self.k = np.full(len(lengths), spec.k, np.int64)
        self.idle = np.zeros(len(lengths), np.int64)  # steps each row has spent at k = 0
        self.done = np.zeros(len(lengths), bool)
        self.eos = np.array(session.manifest.tokenizer.eos_token_ids or [-1], np.int64)
        # an engine that samples on device picks the prefill's token; the verify rows are
        # sampled here by the same definition (arx::sample's host face)
        self.sampler = steps.host or Sampler(steps.sampling, session.manifest.vocab_size)
        self.device_verify = _device_verify(session, options.sampling)  # --logits verify

    def run(self, plens: np.ndarray) -> None:
        t0 = time.perf_counter()
        ids = self.text[:, : int(plens.max())]  # (B, P) right-padded prompts
        first = self.steps(ids, plens)
        self.result.prefill_s = time.perf_counter() - t0
        self._commit(first[:, None], np.ones(len(plens), np.int64))
        while not self.done.all():
            t = time.perf_counter()
            produced = self._round()
            self.result.step_s.append(time.perf_counter() - t)
            self.result.step_rows.append(produced)

    def _round(self) -> int:
        stats, live = self.result.speculation, ~self.done
        t = time.perf_counter()
        prop = self.proposer.propose(self.text, self.lengths, self._want(), self.seen)
        prop.lengths[self.done] = 0
        stats.draft_s += time.perf_counter() - t
        t = time.perf_counter()
        accepted, nxt = self._verify(prop)
        stats.verify_s += time.perf_counter() - t
        self.proposer.commit(accepted)
        new = np.zeros((len(nxt), int(accepted.max()) + 1), np.int64)  # (B, a + 1)
        for b in range(len(nxt)):
            new[b, : accepted[b]] = prop.tokens[b, : accepted[b]]
            new[b, accepted[b]] = nxt[b]
        produced = self._commit(new, np.where(live, accepted + 1, 0))
        stats.target_steps += 1
        stats.row_steps += int(live.sum())
        stats.proposing_steps += int((prop.lengths > 0).sum())
        stats.proposed += int(prop.lengths.sum())
        stats.accepted += int(accepted[live].sum())
        stats.produced += produced
        if self.spec.adaptive:
            self._adapt(prop.lengths, accepted)
        return produced

    def _adapt(self, proposed: np.ndarray, accepted: np.ndarray) -> None:
        tried = proposed > 0
        grown = np.where(accepted == proposed, self.k + 2, self.k - 1)
        k = np.where(tried, np.clip(grown, 0, self.spec.max_k), self.k)
        idle = np.where(k == 0, self.idle + 1, 0)
        retry = idle > self.spec.cooldown
        self.k, self.idle = np.where(retry, 1, k), np.where(retry, 0, idle)

    def _want(self) -> np.ndarray:
        """Proposals each row may get: its k, one fewer than the tokens it still needs (the
        verify step adds one of the target's), none when done; the verify step's width must
        fit every row's cache (padding is written too)."""
        cache = self.steps.cache
        left = np.array([self.options.max_new_tokens - len(t) for t in self.result.tokens])
        cap = getattr(cache, "max_seq_len", self.session.capacity.max_seq_len)  # engine: static
        room = cap - int(cache.lengths.max()) - 1
        want = np.minimum(np.minimum(self.k, left - 1), room)
        return np.where(self.done, 0, np.maximum(want, 0))

    def _verify(self, prop: Proposal) -> tuple[np.ndarray, np.ndarray]:
        """One target step over [last token, proposals] per row; -> (accepted (B,), the
        target's token after them (B,)). Rolls the target's cache back to the kept text."""
        cache, batch = self.steps.cache, len(self.lengths)
        ids = np.zeros((batch, 1 + prop.tokens.shape[1]), np.int64)  # (B, 1 + K) right-padded
        ids[:, 0] = self.text[np.arange(batch), self.lengths - 1]
        ids[:, 1:] = prop.tokens
        base = cache.lengths.copy()
        accepted, nxt = self._judge(cache, ids, prop, base)
        cache.rollback(np.where(self.done, base, base + 1 + accepted))
        return accepted, nxt

    def _judge(self, cache, ids: np.ndarray, prop: Proposal, base: np.ndarray):
        """The verify step and its verdict: (accepted (B,), the token after them (B,)), from
        the engine's own greedy ids (--logits verify) or from every position's logits."""
        if self.device_verify:
            return _accept_ids(self.session.step_verify(cache, ids, 1 + prop.lengths), prop)
        logits = self.session.step(cache, ids, 1 + prop.lengths, logits="all")  # (B, 1 + K, V)
        seen = _seen_at(self.seen, prop.tokens)  # (B, 1 + K, V) or None
        if self.options.sampling.do_sample:
            return _accept_sampled(self.sampler, logits, seen, prop, base + 1)
        return _accept_greedy(self.sampler, logits, seen, prop)

    def _commit(self, new: np.ndarray, counts: np.ndarray) -> int:
        """Record new[b, :counts[b]] for each unfinished row (EOS stops a row mid-way, and
        max_new_tokens ends it); -> the tokens recorded."""
        before = sum(len(t) for t in self.result.tokens)
        for j in range(new.shape[1]):
            skip = self.done | (j >= counts)
            was = skip.copy()
            record_tokens(self.result, new[:, j], skip, self.seen, self.eos, self.options,
                          self.on_token)
            self.done |= skip & ~was  # rows that met EOS at this token
            rows = np.flatnonzero(~was & ~self.done)  # keep the text the proposers read
            self.text[rows, self.lengths[rows]] = new[rows, j]
            self.lengths[rows] += 1
        self.done |= np.array([len(t) >= self.options.max_new_tokens for t in self.result.tokens])
        return sum(len(t) for t in self.result.tokens) - before


def _seen_at(seen: np.ndarray | None, proposed: np.ndarray) -> np.ndarray | None:
    """(B, 1 + K, V): the tokens each verify row's logits are penalised for: the committed
    ones, plus the proposals before that row (None: no repetition penalty)."""
    if seen is None:
        return None
    batch, k = proposed.shape
    out = np.repeat(seen[:, None], k + 1, axis=1)
    for i in range(k):
        rows, later = np.arange(batch)[:, None], np.arange(i + 1, k + 1)[None, :]
        out[rows, later, proposed[:, i, None]] = True
    return out


def _device_verify(session, sampling) -> bool:
    """Whether the target is an engine built with --logits verify and the selection is plain
    greedy (its ArgMax sees no repetition penalty): proposals are then checked against the
    engine's own ids, and no logits leave the device."""
    return (VERIFY_IDS in getattr(session, "outputs", ()) and not sampling.do_sample
            and sampling.repetition_penalty == 1.0)


def _accept_greedy(sampler, logits, seen, prop: Proposal) -> tuple[np.ndarray, np.ndarray]:
    batch, rows, vocab = logits.shape
    flat = None if seen is None else seen.reshape(batch * rows, vocab)
    target = sampler(logits.reshape(batch * rows, vocab), flat,
                     np.zeros(batch * rows, np.int64)).reshape(batch, rows)  # greedy: no draws
    return _accept_ids(target, prop)


def _accept_ids(target: np.ndarray, prop: Proposal) -> tuple[np.ndarray, np.ndarray]:
    """target (B, 1 + K): the greedy token after each verify position -> (the leading
    proposals equal to it (B,), the target's token after them (B,))."""
    batch, rows = target.shape
    match = (target[:, :-1] == prop.tokens) & (np.arange(rows - 1)[None] < prop.lengths[:, None])
    accepted = np.cumprod(match, axis=1).sum(axis=1).astype(np.int64)  # leading matches
    return accepted, target[np.arange(batch), accepted]


def _accept_sampled(sampler, logits, seen, prop: Proposal, first_pos: np.ndarray):
    """The rejection rule per row (module docstring); first_pos (B,): the position of each
    row's first proposal. -> (accepted (B,), the token after them (B,))."""
    batch, rows, vocab = logits.shape
    flat = None if seen is None else seen.reshape(batch * rows, vocab)
    q = sampler.probs(logits.reshape(batch * rows, vocab), flat).reshape(batch, rows, vocab)
    k = prop.tokens.shape[1]
    pos = first_pos[:, None] + np.arange(k)[None]  # (B, K) each proposal's position
    u = accept_uniforms(sampler.seed, pos.ravel(), np.repeat(np.arange(batch), k)).reshape(batch, k)
    accepted, nxt = prop.lengths.copy(), np.full(batch, -1, np.int64)
    for b in range(batch):
        for i in range(int(prop.lengths[b])):
            d = int(prop.tokens[b, i])
            p = prop.probs[b, i] if prop.probs is not None else _point_mass(d, vocab)
            token = judge(q[b, i], p, d, u[b, i], sampler.seed, int(pos[b, i]), b)
            if token >= 0:
                accepted[b], nxt[b] = i, token
                break
    # all kept: the bonus token, drawn by the sampler itself at its position
    last = logits[np.arange(batch), accepted]
    bonus = sampler(last, None if seen is None else seen[np.arange(batch), accepted],
                    first_pos + accepted)
    return accepted, np.where(nxt < 0, bonus, nxt)


def _point_mass(token: int, vocab: int) -> np.ndarray:
    p = np.zeros(vocab, np.float64)
    p[token] = 1.0
    return p


def accept_uniforms(seed: int, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(N,) the accept test's uniform for each (position, row): the accept stream."""
    return uniforms(seed, np.asarray(positions, np.int64) | ACCEPT_STREAM, rows, 1)[:, 0]


def judge(q: np.ndarray, p: np.ndarray, d: int, u: float, seed: int, pos: int, row: int) -> int:
    """The rejection rule for proposal d at position pos of a row, q the target's (V,) and p the
    draft's (V,) distribution there, u its accept_uniforms draw: -1 when d is kept
    (u * p(d) < q(d): probability min(1, q(d) / p(d))), else a token from norm(max(q - p, 0))."""
    return -1 if u * p[d] < q[d] else residual_draw(q, p, seed, pos, row)


def residual_draw(q: np.ndarray, p: np.ndarray, seed: int, pos: int, row: int) -> int:
    """A token from norm(max(q - p, 0)) (q target, p draft), Gumbel-max on Philox uniforms of
    the residual stream at `pos`; q itself where the residual has no mass (q == p)."""
    r = np.maximum(q - p, 0.0)
    return gumbel_draw(r if r.sum() > 0 else q, seed, pos | RESIDUAL_STREAM, row)


def gumbel_draw(weights: np.ndarray, seed: int, offset: int, row: int) -> int:
    """A token drawn in proportion to `weights` (V,) (any non-negative mass), Gumbel-max on
    the Philox uniforms at (offset, row): the same draw for the same seed, offset and row."""
    return int(gumbel_draws(weights[None], seed, np.array([offset]), row)[0])


def gumbel_draws(weights: np.ndarray, seed: int, offsets: np.ndarray, row: int) -> np.ndarray:
    """gumbel_draw for N rows of weights (N, V) at N offsets in one Philox call -> (N,)."""
    u = uniforms(seed, np.asarray(offsets, np.int64), np.full(len(offsets), row), weights.shape[1])
    with np.errstate(divide="ignore"):
        score = np.log(weights) - np.log(-np.log(u.astype(np.float64)))
    return np.argmax(score, axis=1).astype(np.int64)


def profile_speculation(session, bundle, opts, results, tick) -> None:
    """`arx profile --draft/--lookup`: time every shape again with speculation (the profiler's
    prompts, greedy) and set each result's `speculation`: its speed, acceptance and speed-up
    over the plain timing in `results`."""
    from arx.runtime.proposers import open_proposer
    from arx.runtime.profiler import time_shape

    spec, last = SpeculativeOptions.parse(opts.speculate), []

    def run(prompts, options):
        last[:] = [generate_speculative(session, proposer, prompts, options, spec)]
        return last[0]

    with open_proposer(session.manifest, bundle, draft=opts.draft, lookup=opts.lookup,
                       backend_options=session.options) as proposer:
        for r in results:
            timed = time_shape(run, session.manifest.vocab_size, opts, r.prompt_len, r.batch, tick)
            stats = last[0].speculation.to_json()
            r.speculation = {"ttft_ms": timed.ttft_ms, "decode_ms": timed.decode_ms,
                             "tokens_per_s": timed.tokens_per_s,
                             "speedup": timed.tokens_per_s / r.tokens_per_s
                             if r.tokens_per_s else 0.0,
                             **{k: stats[k] for k in ("method", "acceptance_rate", "mean_accepted",
                                                      "tokens_per_target_step")}}
