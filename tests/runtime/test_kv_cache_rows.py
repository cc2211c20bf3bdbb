"""KVCache.row(b): one row of a batch cache stepped at batch 1, over the same memory."""

from __future__ import annotations

import numpy as np

from arx.runtime.decoder import DecoderSession


def test_row_steps_write_into_the_batch_cache(exported_bundle):
    """Prefill row 1 of a 3-row cache alone, in two chunks (the second after a past, at batch
    1: the fused graph), then decode every row together: row 1's logits equal a batch-1 run of
    the same tokens, and the other rows are untouched by the row steps."""
    prompt, nxt = np.array([[5, 9, 14, 22, 7, 3, 11]]), 42
    with DecoderSession(exported_bundle("llama")) as s:
        alone = s.new_cache(1, 32)
        s.step(alone, prompt, np.array([7]))
        want = s.step(alone, np.array([[nxt]]), np.array([1]), logits="last")

        batch = s.new_cache(3, 32)
        row = batch.row(1)
        assert row is not None and batch.row(1) is row
        s.step(row, prompt[:, :4], np.array([4]))
        s.step(row, prompt[:, 4:], np.array([3]))
        np.testing.assert_array_equal(batch.lengths, [0, 7, 0])
        first = batch.buffers["past_key_values.0.key"].numpy()
        assert not first[0].any() and not first[2].any() and first[1, :, :7].any()
        got = s.step(batch, np.array([[1], [nxt], [1]]), np.ones(3, np.int64), logits="last")
        np.testing.assert_allclose(got[1], want[0], atol=1e-5, rtol=0)
        assert s._general is None  # every step above ran on the fused graph


def test_a_closed_caches_buffers_serve_the_next_cache_of_its_shape(exported_bundle):
    """A cache closed and a new one of the same shape: the same host memory (no fresh pages to
    fault in), stale entries never read (the same logits as a cache made afresh), and a cache
    of another shape gets buffers of its own; closing the session drops what was kept."""
    prompt = np.array([[5, 9, 14, 22, 7, 3, 11]])
    with DecoderSession(exported_bundle("llama")) as s:
        first = s.new_cache(2, 32)
        s.step(first, np.repeat(prompt, 2, 0), np.array([7, 5]))
        want = s.step(first, np.array([[4], [8]]), np.ones(2, np.int64), logits="last")
        held = [id(v) for v in first.buffers.values()]
        first.close()
        again = s.new_cache(2, 32)
        assert [id(v) for v in again.buffers.values()] == held
        assert again.buffers["past_key_values.0.key"].numpy().any()  # stale, and harmless:
        s.step(again, np.repeat(prompt, 2, 0), np.array([7, 5]))
        got = s.step(again, np.array([[4], [8]]), np.ones(2, np.int64), logits="last")
        np.testing.assert_array_equal(got, want)
        again.close()
        other = s.new_cache(3, 32)  # another shape: the kept buffers go first
        assert not {id(v) for v in other.buffers.values()} & set(held)
        assert s.backend._free == {}
        other.close()
    assert s.backend._free == {}
