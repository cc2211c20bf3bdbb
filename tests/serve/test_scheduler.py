"""The continuous-batching scheduler driven step by step (no HTTP, no thread): admission between
steps, chunked prefill while other rows decode, cancellation freeing the slot, per-row sampling,
and each request's tokens equal to `generate` on its prompt alone, whatever batch it ran in."""

from __future__ import annotations

import numpy as np
import pytest

from arx.errors import ArxError
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate
from arx.runtime.sampler import SamplingOptions
from arx.serve.scheduler import Overloaded, Request, Scheduler

GREEDY = SamplingOptions()
SAMPLED = SamplingOptions(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)


class Recorder:
    """Collects every request's events; `done` maps request id -> its last event."""

    def __init__(self):
        self.events, self.done = [], {}

    def request(self, prompt, max_tokens, sampling=GREEDY, **kw) -> Request:
        return Request(list(map(int, prompt)), max_tokens, sampling, on_event=self._on, **kw)

    def _on(self, event):
        self.events.append(event)
        if event.kind != "token":
            self.done[event.request_id] = event

    def tokens(self, request_id):
        return [e.token for e in self.events if e.request_id == request_id and e.kind == "token"]


def run_until_done(scheduler, rec, requests, limit=500):
    for _ in range(limit):
        if all(r.id in rec.done for r in requests):
            return
        scheduler.step()
    raise AssertionError("requests did not finish")


def alone(session, prompt, max_tokens, sampling):
    options = GenerateOptions(max_new_tokens=max_tokens, sampling=sampling)
    return generate(session, [list(map(int, prompt))], options).tokens[0]


@pytest.fixture(scope="module")
def session(exported_bundle):
    with DecoderSession(exported_bundle("llama")) as s:
        yield s


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 150, int(k))) for k in rng.integers(2, 30, n)]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_each_request_equals_generate_alone(session, sampling):
    """7 requests through 3 slots with 5-token prefill chunks: admitted as slots free, prompts
    prefilled over several steps beside decoding rows; each one's tokens equal generate's."""
    rec, sched = Recorder(), Scheduler(session, 3, chunk=5)
    prompts = _prompts(7)
    reqs = [rec.request(p, 6 + 3 * i, sampling, stop_on_eos=False) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.submit(r)
    run_until_done(sched, rec, reqs)
    for r in reqs:
        assert rec.tokens(r.id) == alone(session, r.prompt, r.max_tokens, sampling)
        assert rec.done[r.id].finish_reason == "length"
    assert sched.stats() == {"running": 0, "waiting": 0, "free_slots": 3, "max_batch": 3}
    np.testing.assert_array_equal(sched.cache.lengths, 0)


def test_per_row_sampling_parameters_in_one_batch(session):
    """A greedy row, two sampled rows with different filters and seeds: one full batch."""
    rec, sched = Recorder(), Scheduler(session, 3)
    settings = [GREEDY, SAMPLED, SamplingOptions(do_sample=True, temperature=1.3, seed=123,
                                                  repetition_penalty=1.2)]
    prompts = _prompts(3, seed=1)
    reqs = [rec.request(p, 12, s, stop_on_eos=False) for p, s in zip(prompts, settings)]
    for r in reqs:
        sched.submit(r)
    sched.step()
    assert sched.stats()["running"] == 3  # all in the same steps
    run_until_done(sched, rec, reqs)
    for r, s in zip(reqs, settings):
        assert rec.tokens(r.id) == alone(session, r.prompt, 12, s)


def test_chunked_prefill_keeps_running_rows_streaming(session):
    rec, sched = Recorder(), Scheduler(session, 2, chunk=8)
    first = rec.request([5, 6, 7], 40, stop_on_eos=False)
    sched.submit(first)
    sched.step()  # prefill of the first: it has its first token
    long = rec.request(list(range(10, 50)), 4, stop_on_eos=False)  # 40 tokens: 5 chunks of 8
    sched.submit(long)
    for k in range(5):
        before = len(rec.tokens(first.id))
        sched.step()
        assert len(rec.tokens(first.id)) == before + 1, f"step {k}: the running row stalled"
        assert len(rec.tokens(long.id)) == (1 if k == 4 else 0)  # first token after its prompt
    assert int(sched.cache.lengths[1]) == 40
    run_until_done(sched, rec, [first, long])
    assert rec.tokens(long.id) == alone(session, long.prompt, 4, GREEDY)
    assert rec.tokens(first.id) == alone(session, first.prompt, 40, GREEDY)


class Widths:
    """A session that records each step's (batch, width)."""

    def __init__(self, session):
        self.inner, self.shapes = session, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, cache, ids, *a, **k):
        self.shapes.append(ids.shape)
        return self.inner.step(cache, ids, *a, **k)


def test_prefill_budget_is_chunk_beside_decoding_rows_and_idle_chunk_alone(session):
    """A 30-token prompt admitted alone is fed idle_chunk (12) tokens a step; admitted while
    another request decodes, chunk (4) tokens a step, and the running request gets a token
    every step with at most 4 prompt tokens run between two of its tokens."""
    recorder = Widths(session)
    rec, sched = Recorder(), Scheduler(recorder, 2, chunk=4, idle_chunk=12)
    first = rec.request(list(range(10, 40)), 30, stop_on_eos=False)
    sched.submit(first)
    for _ in range(3):
        sched.step()
    assert [w for _, w in recorder.shapes] == [12, 12, 6]  # then its first token is drawn
    second = rec.request(list(range(50, 80)), 3, stop_on_eos=False)
    sched.submit(second)
    recorder.shapes.clear()
    for k in range(8):  # 30 tokens in chunks of 4: 7 x 4 + 2
        before = len(rec.tokens(first.id))
        sched.step()
        assert len(rec.tokens(first.id)) == before + 1, f"step {k}: the running row stalled"
    prefills = [w for b, w in recorder.shapes if w > 1]
    assert prefills == [4] * 7 + [2] and all(b == 1 for b, w in recorder.shapes if w > 1)
    run_until_done(sched, rec, [first, second])
    assert rec.tokens(second.id) == alone(session, second.prompt, 3, GREEDY)
    assert rec.tokens(first.id) == alone(session, first.prompt, 30, GREEDY)


def test_a_prompt_that_got_its_first_token_caps_the_idle_budget(session):
    """Two prompts admitted together with nothing decoding: the first (5 tokens) takes 5 of
    the idle 12 and draws its first token; from then on it waits for its next one, so the
    second gets at most chunk (3) more in that step, and chunk a step after."""
    recorder = Widths(session)
    rec, sched = Recorder(), Scheduler(recorder, 2, chunk=3, idle_chunk=12)
    a, b = rec.request(list(range(10, 15)), 4), rec.request(list(range(20, 30)), 4)
    for r in (a, b):
        sched.submit(r)
    sched.step()
    assert [w for _, w in recorder.shapes] == [5, 3]  # a's prompt, then b's chunk (not 7)
    sched.step()
    assert [w for _, w in recorder.shapes][2:] == [3, 1]  # b's next chunk, a's decode
    run_until_done(sched, rec, [a, b])
    assert rec.tokens(b.id) == alone(session, b.prompt, 4, GREEDY)


def test_cancel_frees_the_slot_before_the_next_step(session):
    rec, sched = Recorder(), Scheduler(session, 1)
    a = rec.request([5, 6, 7], 50, stop_on_eos=False)
    b = rec.request([8, 9], 5, stop_on_eos=False)
    sched.submit(a)
    sched.submit(b)
    for _ in range(3):
        sched.step()
    assert sched.stats() == {"running": 1, "waiting": 1, "free_slots": 0, "max_batch": 1}
    sched.cancel(a.id)
    sched.step()  # a is dropped, b admitted and prefilled in the same step
    assert rec.done[a.id].finish_reason == "cancelled"
    assert len(rec.tokens(a.id)) == 3
    assert int(sched.cache.lengths[0]) == 2 and len(rec.tokens(b.id)) == 1
    run_until_done(sched, rec, [b])
    assert rec.tokens(b.id) == alone(session, b.prompt, 5, GREEDY)  # nothing of a's left
    sched.cancel(rec.request([1], 1).id)  # an id that is not (any longer) there: no effect
    assert sched.step() is False


def test_cancel_while_waiting(session):
    rec, sched = Recorder(), Scheduler(session, 1)
    a, b = rec.request([5, 6], 30), rec.request([7, 8], 30)
    sched.submit(a)
    sched.submit(b)
    sched.step()
    sched.cancel(b.id)
    sched.step()
    assert rec.done[b.id].finish_reason == "cancelled" and not rec.tokens(b.id)
    assert sched.stats()["waiting"] == 0


def test_full_queue_and_impossible_requests_are_refused(session):
    rec, sched = Recorder(), Scheduler(session, 1, max_queue=2)
    for _ in range(2):
        sched.submit(rec.request([5, 6], 4))
    with pytest.raises(Overloaded, match="queue is full") as e:
        sched.submit(rec.request([5, 6], 4))
    assert e.value.retry_after >= 1
    ctx = session.capacity.max_seq_len
    for prompt, n, message in (([], 4, "empty"), ([5, 999], 4, "outside the vocabulary"),
                               ([5] * (ctx - 3), 4, "exceeds"), ([5], 0, "max_tokens")):
        with pytest.raises(ArxError, match=message):
            sched.check(rec.request(prompt, n))
    with pytest.raises(ArxError, match="tokenizer"):  # this bundle has none
        sched.check(rec.request([5], 3, stop=("x",)))


def test_eos_finishes_with_stop(session):
    """A request stops at EOS: pick as EOS the token greedy produces third."""
    want = alone(session, [5, 6, 7], 8, GREEDY)
    rec, sched = Recorder(), Scheduler(session, 2)
    sched.eos = frozenset({want[2]})
    r = rec.request([5, 6, 7], 8)
    sched.submit(r)
    run_until_done(sched, rec, [r])
    assert rec.tokens(r.id) == want[: want.index(want[2]) + 1]
    assert rec.done[r.id].finish_reason == "stop"


class FailingOnce:
    """A session whose next step raises (a backend failure mid-serving)."""

    def __init__(self, session):
        self.inner, self.fail = session, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, *a, **k):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        return self.inner.step(*a, **k)


def test_a_failed_step_fails_its_requests_and_serving_goes_on(session):
    flaky = FailingOnce(session)
    rec, sched = Recorder(), Scheduler(flaky, 2)
    a = rec.request([5, 6, 7], 10)
    sched.submit(a)
    sched.step()
    flaky.fail = True
    sched.step()
    assert rec.done[a.id].kind == "error" and "device lost" in rec.done[a.id].message
    assert sched.stats()["free_slots"] == 2
    b = rec.request([5, 6, 7], 6, stop_on_eos=False)
    sched.submit(b)
    run_until_done(sched, rec, [b])
    assert rec.tokens(b.id) == alone(session, b.prompt, 6, GREEDY)


def test_free_slots_keep_decode_on_the_fused_graph(exported_bundle):
    """A lone request in a 3-slot scheduler: its prefill and its decode steps run over its own
    row only, on the fused graph (a row with no new token would send every step to the
    general-step graph), and the tokens are generate's."""
    with DecoderSession(exported_bundle("llama")) as fresh:
        rec, sched = Recorder(), Scheduler(fresh, 3)
        widths, step = [], fresh.step
        fresh.step = lambda cache, ids, *a, **k: widths.append(ids.shape[0]) or step(cache, ids, *a, **k)
        r = rec.request([5, 6, 7, 8], 10, stop_on_eos=False)
        sched.submit(r)
        sched.step()
        np.testing.assert_array_equal(sched.cache.lengths, [4, 0, 0])  # fillers forgotten
        run_until_done(sched, rec, [r])
        assert fresh._general is None  # the general-step graph was never opened
        assert set(widths) == {1}  # prefill and decode over the occupied row only
        del fresh.step
        assert rec.tokens(r.id) == alone(fresh, r.prompt, 10, GREEDY)
