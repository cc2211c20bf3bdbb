"""The autoregressive loop, one for every backend: prefill the prompts, then one step per token.

    generate ── TokenSteps ──► session.step(cache, ids, new_lens, logits="last")   (B, 1, V)
                   │              └─ ONNX Runtime (runtime/decoder.py) or a TensorRT engine
                   │                 (runtime/engine_session.py), same step API
                   └─► token choice: the host Sampler (the NumPy face of arx::sample) on the
                       step's logits, or the engine's own arx::sample / ArgMax when it has one

A session is anything with `manifest`, `capacity` (Capacity), `ragged` (per-row lengths in
the cache), `new_cache(batch, max_len)` (a cache with per-row `lengths`, `rollback`, `close`)
and `step(...)`; an engine session adds `device_sampling(cache, sampling, seen)` and
`step_tokens(cache, ids, new_lens)` for engines that choose tokens themselves.

Batches of prompts of different lengths are right-padded for the prefill; every sequence then
keeps its own length in the cache (no left padding, no wasted attention). The Philox offset of
each drawn token is its position (the row's length before it), so the host and the engine draw
the same tokens for the same seed. Finished sequences ride along until all are done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest
from arx.runtime.sampler import Sampler, SamplingOptions, resolve_seed

# on_token(sequence index, token id) is called as soon as a token is chosen (streaming).
TokenCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int | None = 64  # None: as many as the context holds
    sampling: SamplingOptions = SamplingOptions()
    stop_on_eos: bool = True
    # clip max_new_tokens to the room the context leaves (finish "length") instead of refusing:
    # for a default the user did not choose (a bundle's 64 never fits a 64-token context)
    fit_context: bool = False

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ArxError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")


@dataclass(frozen=True)
class Capacity:
    """What one cache of a session holds, and what to tell a user who needs more."""

    max_seq_len: int
    what: str  # "the bundle's context", "the engine's static cache"
    remedy: str  # how to get a longer one
    max_batch: int | None = None
    batch_remedy: str = ""


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, without the prompt
    finish_reasons: list[str]  # "eos" | "length"
    prompt_lengths: list[int]
    prefill_s: float = 0.0  # time to first token (prefill + first sampling)
    step_s: list[float] = field(default_factory=list)  # each decode step, whole batch
    step_rows: list[int] = field(default_factory=list)  # unfinished rows each step produced for

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode steps produced for unfinished rows, per second (rows that hit EOS
        ride along in the batch but produce nothing)."""
        t = sum(self.step_s)
        return sum(self.step_rows) / t if t else 0.0


class TokenSteps:
    """One generation's cache and token choice over a session: `__call__(ids, new_lens)` runs a
    step and returns the token that follows each row."""

    def __init__(self, session, batch: int, max_len: int, sampling: SamplingOptions,
                 seen: np.ndarray | None):
        self.session, self.seen = session, seen
        self.sampling = replace(sampling, seed=resolve_seed(sampling.seed))  # one seed for both faces
        self.cache = session.new_cache(batch, max_len)
        choose = getattr(session, "device_sampling", None)
        self.on_device = bool(choose and choose(self.cache, self.sampling, seen))
        self.host = None if self.on_device else Sampler(self.sampling, session.manifest.vocab_size)

    def __call__(self, ids: np.ndarray, new_lens: np.ndarray) -> np.ndarray:
        if self.on_device:
            return self.session.step_tokens(self.cache, ids, new_lens)
        logits = self.session.step(self.cache, ids, new_lens, logits="last")[:, 0]  # (B, V)
        return self.host(logits, self.seen, self.cache.lengths)  # offset = the new position

    def close(self) -> None:
        self.cache.close()


def generate(session, prompts: list[list[int]], options: GenerateOptions,
             on_token: TokenCallback | None = None) -> GenerationResult:
    options = check_prompts(session.manifest, session.capacity, prompts, options)
    lengths = [len(p) for p in prompts]
    if not session.ragged and len(set(lengths)) > 1:
        # concat-mode graphs have no per-sequence lengths: run such batches one by one
        parts = [generate(session, [p], options,
                          (lambda i: (lambda _, t: on_token(i, t)))(i) if on_token else None)
                 for i, p in enumerate(prompts)]
        return _merge(parts)
    return _generate_batch(session, prompts, options, on_token)


def _generate_batch(session, prompts, options, on_token) -> GenerationResult:
    m = session.manifest
    batch, lengths = len(prompts), np.array([len(p) for p in prompts], dtype=np.int64)
    eos = np.array(m.tokenizer.eos_token_ids or [-1], dtype=np.int64)
    seen = seen_tokens(prompts, m.vocab_size) if options.sampling.repetition_penalty != 1.0 else None
    # only as long as this request needs: (B, kv_heads, prompt + new, D) per layer
    steps = TokenSteps(session, batch, int(lengths.max()) + options.max_new_tokens,
                       options.sampling, seen)
    result = GenerationResult([[] for _ in prompts], ["length"] * batch, lengths.tolist())
    done = np.zeros(batch, dtype=bool)
    try:
        t0 = time.perf_counter()
        ids = np.zeros((batch, int(lengths.max())), dtype=np.int64)  # (B, P) right-padded
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        nxt = steps(ids, lengths)  # the token after each prompt
        for step in range(options.max_new_tokens):
            if step == 0:
                result.prefill_s = time.perf_counter() - t0
            else:
                result.step_rows.append(int((~done).sum()))
            record_tokens(result, nxt, done, seen, eos, options, on_token)
            if done.all() or step == options.max_new_tokens - 1:
                break
            t = time.perf_counter()
            nxt = steps(nxt[:, None], np.ones(batch, dtype=np.int64))
            result.step_s.append(time.perf_counter() - t)
    finally:
        steps.close()
    return result


def seen_tokens(prompts: list[list[int]], vocab: int) -> np.ndarray:
    """(B, V) bool: the tokens of each prompt (what the repetition penalty starts from)."""
    seen = np.zeros((len(prompts), vocab), dtype=bool)
    for b, p in enumerate(prompts):
        seen[b, p] = True
    return seen


def record_tokens(result: GenerationResult, nxt: np.ndarray, done: np.ndarray,
                  seen: np.ndarray | None, eos: np.ndarray, options: GenerateOptions,
                  on_token: TokenCallback | None) -> None:
    """Append each unfinished sequence's new token; mark it seen; stream it; stop at EOS."""
    for b in np.flatnonzero(~done):
        tok = int(nxt[b])
        result.tokens[b].append(tok)
        if seen is not None:
            seen[b, tok] = True
        if on_token:
            on_token(int(b), tok)
        if options.stop_on_eos and tok in eos:
            done[b], result.finish_reasons[b] = True, "eos"


def check_prompts(m: Manifest, capacity: Capacity, prompts: list[list[int]],
                  options: GenerateOptions) -> GenerateOptions:
    """Refuse empty prompts, ids outside the vocabulary, sequences longer than the capacity and
    batches larger than it; return `options` with max_new_tokens resolved (resolve_new_tokens)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ArxError("empty prompt: give at least one token (--prompt TEXT or --prompt-ids 1,2,3)")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < m.vocab_size]
        if bad:
            raise ArxError(f"prompt token id {bad[0]} is outside the vocabulary (0..{m.vocab_size - 1})")
    options = resolve_new_tokens(options, max(len(p) for p in prompts), capacity.max_seq_len,
                                 capacity.what, capacity.remedy)
    if capacity.max_batch is not None and len(prompts) > capacity.max_batch:
        raise ArxError(f"{len(prompts)} prompts exceed the max batch of {capacity.max_batch}; "
                       f"{capacity.batch_remedy or 'give fewer prompts'}")
    return options


def resolve_new_tokens(options: GenerateOptions, longest: int, max_len: int, what: str,
                       remedy: str) -> GenerateOptions:
    """`options` with max_new_tokens a number that fits a cache of `max_len` after the longest
    prompt: as asked, clipped to the room left (fit_context), or all of it (None)."""
    room = max_len - longest
    if options.max_new_tokens is None or options.fit_context:
        if room < 1:
            raise ArxError(f"prompt of {longest} tokens + 1 new token exceeds {what} of {max_len} "
                           f"tokens; shorten the prompt or {remedy}")
        n = room if options.max_new_tokens is None else min(options.max_new_tokens, room)
        return replace(options, max_new_tokens=n, fit_context=False)
    if options.max_new_tokens > room:
        raise ArxError(f"prompt of {longest} tokens + {options.max_new_tokens} new tokens exceeds "
                       f"{what} of {max_len} tokens; shorten the prompt, lower --max-new-tokens "
                       f"(--max-new-tokens context stops at the context), or {remedy}")
    return options


def _merge(parts: list[GenerationResult]) -> GenerationResult:
    return GenerationResult(
        tokens=[p.tokens[0] for p in parts],
        finish_reasons=[p.finish_reasons[0] for p in parts],
        prompt_lengths=[p.prompt_lengths[0] for p in parts],
        prefill_s=sum(p.prefill_s for p in parts),
        step_s=[s for p in parts for s in p.step_s],
        step_rows=[r for p in parts for r in p.step_rows],
    )
