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
