"""The autoregressive loop: prefill the prompts, then one decode step per new token.

Batches of prompts of different lengths are right-padded for the prefill; every sequence then
keeps its own length in the cache (no left padding, no wasted attention), as the fused
attention op tracks per-sequence lengths. Finished sequences ride along until all are done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.sampler import Sampler, SamplingOptions

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


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, without the prompt
    finish_reasons: list[str]  # "eos" | "length"
    prompt_lengths: list[int]
    prefill_s: float = 0.0  # time to first token (prefill + first sampling)
    step_s: list[float] = field(default_factory=list)  # each decode step, whole batch

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.step_s)
        return len(self.tokens) * n / sum(self.step_s) if n else 0.0


def generate(session: DecoderSession, prompts: list[list[int]], options: GenerateOptions,
             on_token: TokenCallback | None = None) -> GenerationResult:
    m = session.manifest
    options = check_prompts(m, m.kv.max_seq_len, prompts, options, "the bundle's context",
                            "re-export with a larger --max-seq-len")
    lengths = [len(p) for p in prompts]
    if not session.in_place and len(set(lengths)) > 1:
        # concat-mode graphs have no per-sequence lengths: run such batches one by one
        parts = [generate(session, [p], options,
                          (lambda i: (lambda _, t: on_token(i, t)))(i) if on_token else None)
                 for i, p in enumerate(prompts)]
        return _merge(parts)
    return _generate_batch(session, prompts, options, on_token)


def _generate_batch(session, prompts, options, on_token) -> GenerationResult:
    m = session.manifest
    batch, lengths = len(prompts), np.array([len(p) for p in prompts], dtype=np.int64)
    sampler = Sampler(options.sampling, m.vocab_size)
    eos = np.array(m.tokenizer.eos_token_ids or [-1], dtype=np.int64)
    seen = seen_tokens(prompts, m.vocab_size) if options.sampling.repetition_penalty != 1.0 else None
    # only as long as this request needs: (B, kv_heads, prompt + new, D) per layer
    cache = session.new_cache(batch, int(lengths.max()) + options.max_new_tokens)
    result = GenerationResult([[] for _ in prompts], ["length"] * batch, lengths.tolist())
    done = np.zeros(batch, dtype=bool)

    t0 = time.perf_counter()
    ids = np.zeros((batch, int(lengths.max())), dtype=np.int64)  # (B, P) right-padded
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    last = session.step(cache, ids, lengths, logits="last")[:, 0]  # (B, V) at each prompt's end
    for step in range(options.max_new_tokens):
        nxt = sampler(last, seen)
        if step == 0:
            result.prefill_s = time.perf_counter() - t0
        record_tokens(result, nxt, done, seen, eos, options, on_token)
        if done.all() or step == options.max_new_tokens - 1:
            break
        t = time.perf_counter()
        last = session.step(cache, nxt[:, None], np.ones(batch, dtype=np.int64), logits="last")[:, 0]
        result.step_s.append(time.perf_counter() - t)
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


def check_prompts(m: Manifest, max_len: int, prompts: list[list[int]], options: GenerateOptions,
                  what: str, remedy: str) -> GenerateOptions:
    """Refuse empty prompts, ids outside the vocabulary and sequences longer than `max_len`;
    return `options` with max_new_tokens resolved (resolve_new_tokens)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ArxError("empty prompt: give at least one token (--prompt TEXT or --prompt-ids 1,2,3)")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < m.vocab_size]
        if bad:
            raise ArxError(f"prompt token id {bad[0]} is outside the vocabulary (0..{m.vocab_size - 1})")
    return resolve_new_tokens(options, max(len(p) for p in prompts), max_len, what, remedy)


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
    )
