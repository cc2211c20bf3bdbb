"""Continuous batching: many requests over one persistent cache of `max_batch` slots.

    submit ──► waiting (FIFO, bounded) ──admit between steps──► slot b of the cache
                                                                  │
    every step: one session.step(cache, ids (B, S), new_lens (B,), logits="last")
        decode rows      1 token (the one sampled last step)
        prefill rows     the next chunk of their prompt, at batch 1 over their own row: all
                         prefills share `chunk` tokens a step while some row decodes (its next
                         token waits for them), `idle_chunk` while none does
        idle rows        0 tokens
    then each row that has consumed its whole prompt draws its next token with its own sampler

A request that finishes (EOS, a stop string, max_tokens) or is cancelled frees its slot before
the next step: `cache.rollback` sets the row back to 0 tokens (nothing is cleared or copied).
Prompts are prefilled in chunks so that the rows already decoding get a token every step
instead of waiting for a long prompt.

Each request draws with its own seed at its own positions, as row 0 of a batch of one (the
Philox counter includes the row index): its tokens do not depend on the slot it got or on
who else runs, and equal `arx generate --seed` on the same prompt alone.

This module imports numpy and the runtime only (no HTTP): `arx.serve.api` drives it from a
thread, tests drive `step()` directly.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from arx.errors import ArxError
from arx.runtime.generate import seen_tokens
from arx.runtime.sampler import Sampler, SamplingOptions
from arx.serve.stops import StopText

# Prompt tokens prefilled per step, all rows together, while some request decodes: a decode
# step waits for them, so they bound the inter-token latency, while narrow chunks cost more per
# token and keep rows out of the batch longer (docs/design.md, "Serving": 32 trades the two on
# the 134M benchmark model). While no request decodes nobody waits: wider chunks.
DEFAULT_CHUNK = 32
DEFAULT_IDLE_CHUNK = 64


@dataclass(frozen=True)
class Event:
    """What a request's `on_event` receives, from the scheduler's thread."""

    request_id: str
    kind: str  # "token" | "done" | "error"
    token: int | None = None
    text: str = ""  # the text that became printable (token), or the held-back tail (done)
    finish_reason: str | None = None  # done: "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""  # error: what went wrong
    logprob: float | None = None  # token, where the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingOptions = SamplingOptions()
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = True
    on_event: Callable[[Event], None] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely


class Overloaded(ArxError):
    """The waiting queue is full: the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class _Slot:
    """A running request: how much of its prompt is in the cache, what it generated."""

    def __init__(self, request: Request, vocab: int, tokenizer, submitted: float):
        self.request, self.fed, self.tokens = request, 0, []
        self.sampler = Sampler(request.sampling, vocab)  # resolves the seed once
        self.seen = (seen_tokens([request.prompt], vocab)
                     if request.sampling.repetition_penalty != 1.0 else None)
        self.decoder = tokenizer.stream() if tokenizer is not None else None
        self.stops = StopText(request.stop)
        self.submitted, self.last = submitted, None

    @property
    def prefilled(self) -> bool:
        return self.fed == len(self.request.prompt)


class Scheduler:
    def __init__(self, session, max_batch: int, *, chunk: int = DEFAULT_CHUNK,
                 idle_chunk: int = DEFAULT_IDLE_CHUNK, max_queue: int | None = None,
                 tokenizer=None, metrics=None):
        if not session.ragged:
            raise ArxError("arx serve needs per-row lengths in the cache, which this bundle's "
                           "concatenating cache (a custom-protocol export) lacks; export the model "
                           "from a Hugging Face folder to get the in-place cache")
        cap = session.capacity
        if min(max_batch, chunk, idle_chunk) < 1:
            raise ArxError(f"--max-batch, --prefill-chunk and --prefill-chunk-idle must be >= 1 "
                           f"(got {max_batch}, {chunk}, {idle_chunk})")
        if cap.max_batch is not None and max_batch > cap.max_batch:
            raise ArxError(f"--max-batch {max_batch} exceeds the max batch of {cap.max_batch}; "
                           f"{cap.batch_remedy or 'lower --max-batch'}")
        self.session, self.max_batch = session, max_batch
        self.chunk, self.idle_chunk = chunk, idle_chunk
        self.max_len, self.capacity = cap.max_seq_len, cap
        self.max_queue = 4 * max_batch if max_queue is None else max_queue
        self.tokenizer, self.metrics = tokenizer, metrics
        m = session.manifest
        self.vocab = m.vocab_size
        self.eos = frozenset(m.tokenizer.eos_token_ids)
        self.cache = session.new_cache(max_batch, self.max_len)
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: deque[tuple[Request, float]] = deque()
        self._cancelled: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.step_s = 0.0  # a running mean of a step's time (Retry-After)

    # -- what other threads call -------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuse what could never run: raises ArxError saying what to change."""
        p = request.prompt
        if not p:
            raise ArxError("the prompt is empty: give at least one token")
        bad = [t for t in p if not 0 <= t < self.vocab]
        if bad:
            raise ArxError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        if request.max_tokens < 1:
            raise ArxError(f"max_tokens must be >= 1 (got {request.max_tokens})")
        if len(p) + request.max_tokens > self.max_len:
            raise ArxError(f"prompt of {len(p)} tokens + max_tokens {request.max_tokens} exceeds "
                           f"{self.capacity.what} of {self.max_len} tokens; shorten the prompt or "
                           f"lower max_tokens")
        if request.stop and self.tokenizer is None:
            raise ArxError("stop strings need the bundle's tokenizer, and this bundle has none")

    def submit(self, request: Request) -> None:
        """Queue a request (checked first); raises Overloaded when the queue is full."""
        self.check(request)
        with self._cv:
            if self._closing:
                raise Overloaded("the server is shutting down", retry_after=1)
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} requests wait for one of "
                                 f"{self.max_batch} slots); retry later",
                                 retry_after=self.retry_after())
            self.waiting.append((request, time.perf_counter()))
            self._cv.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone): its slot is free before the next step."""
        with self._cv:
            self._cancelled.add(request_id)
            self._cv.notify()

    def retry_after(self) -> int:
        """Seconds until a queue place is likely free: the waiting requests' share of steps."""
        return max(1, int(np.ceil(self.step_s * 64 * (len(self.waiting) + 1) / self.max_batch)))

    def stats(self) -> dict:
        running = sum(s is not None for s in self.slots)
        return {"running": running, "waiting": len(self.waiting),
                "free_slots": self.max_batch - running, "max_batch": self.max_batch}

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="arx-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread, fail what is left (the server is going away), free the cache."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        left = [r for r, _ in self.waiting] + [s.request for s in self.slots if s]
        self.waiting.clear()
        self.slots = [None] * self.max_batch
        for r in left:
            _emit(r, Event(r.id, "error", message="the server is shutting down"))
        self.cache.close()

    # -- the scheduler's thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._has_work():
                    self._cv.wait()
                if self._closing:
                    return
            self.step()

    def _has_work(self) -> bool:
        return bool(self.waiting or self._cancelled or any(self.slots))

    def step(self) -> bool:
        """Free cancelled slots, admit waiting requests, run one step; False when idle."""
        with self._cv:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [r for r, _ in self.waiting if r.id in cancelled]
            self.waiting = deque((r, t) for r, t in self.waiting if r.id not in cancelled)
        for r in dropped:
            _emit(r, Event(r.id, "done", finish_reason="cancelled", prompt_tokens=len(r.prompt)))
        for b, slot in enumerate(self.slots):
            if slot is not None and slot.request.id in cancelled:
                self._finish(b, "cancelled", "")
        with self._cv:
            admitted = self._admit()  # into the slots just freed as well
        if not any(self.slots):
            return bool(admitted or dropped)
        t0 = time.perf_counter()
        try:
            alone, fresh = self._prefill_alone()
            ids, new_lens, idle = self._batch(alone, fresh)
            before = self.cache.lengths.copy()
            if (new_lens > 0).sum() > len(idle):  # some row has real tokens
                cache, n = self._decode_rows(new_lens, idle)
                logits = self.session.step(cache, ids[:n], new_lens[:n], logits="last")[:, 0]
            else:
                new_lens, idle = np.zeros_like(new_lens), []
        except Exception as e:  # noqa: BLE001 - the server keeps serving the requests to come
            self._fail_running(e)
            return True
        if idle:  # the fillers are forgotten at once
            lengths = self.cache.lengths.copy()
            lengths[idle] = before[idle]
            self.cache.rollback(lengths)
        for b, slot in enumerate(self.slots):
            if slot is not None and b not in idle and new_lens[b]:
                slot.fed += int(new_lens[b]) if not slot.prefilled else 0
                if slot.prefilled:
                    self._advance(b, slot, logits[b:b + 1])
        took = time.perf_counter() - t0
        self.step_s = took if not self.step_s else 0.9 * self.step_s + 0.1 * took
        if self.metrics is not None:
            self.metrics.step(took, int((new_lens > 0).sum()) - len(idle))
        return True

    def _admit(self) -> list[int]:
        """Put waiting requests into free slots, oldest first (under the lock)."""
        admitted = []
        for b in range(self.max_batch):
            if self.slots[b] is None and self.waiting:
                request, submitted = self.waiting.popleft()
                self.slots[b] = _Slot(request, self.vocab, self.tokenizer, submitted)
                admitted.append(b)
        return admitted

    def _prefill_alone(self) -> tuple[bool, set[int]]:
        """Prefill chunks (--prefill-chunk tokens in all) at batch 1, each over its slot's own
        row of the cache: the fused graph takes a chunk after a past at batch 1, while a chunk
        in the batched step would send every row to the general-step graph (attention over
        every row's whole buffer: seconds per step at 16 slots). Returns (False, ...) where the
        cache has no row views (a device cache): the chunks then ride in the batched step; and
        the rows whose prompt this step finished (their first token is drawn, not yet fed)."""
        rows = [b for b, slot in enumerate(self.slots) if slot is not None and not slot.prefilled]
        if not rows:
            return True, set()
        if getattr(self.cache, "row", None) is None or self.cache.row(rows[0]) is None:
            return False, set()
        budget, fresh = self._prefill_budget(), set()
        for b in rows:
            slot = self.slots[b]
            room = self.max_len - int(self.cache.lengths[b])
            toks = slot.request.prompt[slot.fed: slot.fed + min(budget, room)]
            if not toks:
                break
            budget -= len(toks)
            logits = self.session.step(self.cache.row(b), np.array([toks], np.int64),
                                       np.array([len(toks)], np.int64), logits="last")[:, 0]
            slot.fed += len(toks)
            if slot.prefilled:
                fresh.add(b)
                self._advance(b, slot, logits)
                # it waits for its next token now: what runs before that is prefill budget
                budget = min(budget, self.chunk)
        return True, fresh

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may prefill: `chunk` while some request decodes, since its
        next token waits for them; `idle_chunk` while none does (no one waits, and a wider
        chunk costs less per token, so the prompts get their first tokens sooner)."""
        decoding = any(s is not None and s.prefilled for s in self.slots)
        return self.chunk if decoding else self.idle_chunk

    def _decode_rows(self, new_lens: np.ndarray, idle: list[int]):
        """(cache, n): the batched step runs over rows 0..n-1 only, up to the last row with a
        real token (slots fill lowest first), where the cache has row views: a lone request
        then pays for one row, not for max-batch rows of fillers."""
        busy = [b for b in np.flatnonzero(new_lens) if b not in idle]
        n = int(busy[-1]) + 1
        rows = getattr(self.cache, "rows", None)
        view = rows(0, n) if rows is not None and n < self.max_batch else None
        return (view, n) if view is not None else (self.cache, self.max_batch)

    def _batch(self, prefilled_alone: bool, fresh: set[int]) -> tuple[np.ndarray, np.ndarray,
                                                                      list[int]]:
        """(B, S) right-padded ids, (B,) new tokens per row for the next step, and the rows
        given one filler token (free rows, and rows still prefilling on their own): a step where
        every row decodes one token, or where no row has a past, runs on the fused graph, while
        a row with no new token would send the whole step to the general-step graph."""
        new_lens = np.zeros(self.max_batch, np.int64)
        feed: dict[int, list[int]] = {}
        # a step S wide writes S cache entries per row (padding included): the fullest row
        # bounds the width, so near the end of the context prefill chunks shrink, decode stays
        room = self.max_len - int(np.max(self.cache.lengths))
        budget = min(self._prefill_budget(), max(room, 1))
        for b, slot in enumerate(self.slots):
            if slot is None:
                continue
            if slot.fed == len(slot.request.prompt) and slot.tokens and b not in fresh:
                feed[b] = slot.tokens[-1:]
            elif budget > 0 and not prefilled_alone:
                feed[b] = slot.request.prompt[slot.fed: slot.fed + budget]
                budget -= len(feed[b])
        width = max((len(v) for v in feed.values()), default=1)
        idle = []
        if width == 1 or not self.cache.lengths.any():
            idle = [b for b in range(self.max_batch) if b not in feed]
        ids = np.zeros((self.max_batch, width), np.int64)
        for b, toks in feed.items():
            ids[b, : len(toks)] = toks
            new_lens[b] = len(toks)
        new_lens[idle] = 1  # token 0 into a free slot's first cache entry, rolled back after
        return ids, new_lens, idle

    def _advance(self, b: int, slot: _Slot, logits: np.ndarray) -> None:
        """Draw row b's next token (row 0 of its own batch of one), stream it, maybe finish."""
        request = slot.request
        tok = int(slot.sampler(logits, slot.seen, self.cache.lengths[b:b + 1])[0])
        slot.tokens.append(tok)
        if slot.seen is not None:
            slot.seen[0, tok] = True
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token(now - (slot.last or slot.submitted), first=slot.last is None)
        slot.last = now
        eos = request.stop_on_eos and tok in self.eos
        piece, hit = ("", False) if eos or slot.decoder is None else \
            slot.stops.push(slot.decoder.push(tok))
        _emit(request, Event(request.id, "token", token=tok, text=piece,
                             **_logprobs(logits[0], tok, request.logprobs)))
        if eos or hit:
            self._finish(b, "stop", "" if hit else self._tail(slot))
        elif len(slot.tokens) >= request.max_tokens:
            self._finish(b, "length", self._tail(slot))

    @staticmethod
    def _tail(slot: _Slot) -> str:
        """Text still held back at the end (an incomplete character, a possible stop start)."""
        if slot.decoder is None:
            return ""
        piece, hit = slot.stops.push(slot.decoder.flush())
        return piece if hit else piece + slot.stops.flush()

    def _finish(self, b: int, reason: str, text: str) -> None:
        slot = self.slots[b]
        self.slots[b] = None
        lengths = np.array(self.cache.lengths, np.int64)
        lengths[b] = 0
        self.cache.rollback(lengths)  # the slot is free for the next admission
        r = slot.request
        if self.metrics is not None:
            self.metrics.finished(reason, len(r.prompt), len(slot.tokens),
                                  time.perf_counter() - slot.submitted)
        _emit(r, Event(r.id, "done", text=text, finish_reason=reason,
                       prompt_tokens=len(r.prompt), completion_tokens=len(slot.tokens)))

    def _fail_running(self, error: Exception) -> None:
        message = str(error) if isinstance(error, ArxError) else \
            f"the step failed ({type(error).__name__}: {str(error)[:200]})"
        running = [s.request for s in self.slots if s is not None]
        self.slots = [None] * self.max_batch
        self.cache.rollback(np.zeros(self.max_batch, np.int64))
        for r in running:
            if self.metrics is not None:
                self.metrics.finished("error", len(r.prompt), 0, 0.0)
            _emit(r, Event(r.id, "error", message=message))


def _logprobs(logits: np.ndarray, token: int, top: int | None) -> dict:
    """Event fields for a request that asked for logprobs: the model's log-probabilities
    (before temperature, top-k/top-p and repetition penalty, as vLLM reports them) of the
    drawn token and of the `top` most likely. One pass over the vocabulary, only when asked."""
    if top is None:
        return {}
    z = logits.astype(np.float64)
    logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    top = min(top, len(logp))
    best = np.argpartition(-logp, top - 1)[:top] if top else np.zeros(0, np.int64)
    best = best[np.argsort(-logp[best], kind="stable")]
    return {"logprob": float(logp[token]),
            "top_logprobs": tuple((int(t), float(logp[t])) for t in best)}


def _emit(request: Request, event: Event) -> None:
    if request.on_event is not None:
        request.on_event(event)
