"""DecoderSession.step: last-token logits (what generation uses) equal the full logits' rows."""

from __future__ import annotations

import numpy as np
import pytest

from arx.runtime.decoder import DecoderSession

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def _ragged():
    ids = np.zeros((len(PROMPTS), 5), dtype=np.int64)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)] = p
    return ids, np.array([len(p) for p in PROMPTS])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_last_logits_equal_rows_of_all_logits(family, exported_bundle):
    ids, lens = _ragged()
    with DecoderSession(exported_bundle(family)) as session:
        assert "logits_indices" in session.input_names
        full = session.step(session.new_cache(3, 16), ids, lens, logits="all")  # (B, S, V)
        last = session.step(session.new_cache(3, 16), ids, lens, logits="last")  # (B, 1, V)
    assert full.shape[:2] == (3, 5) and last.shape[:2] == (3, 1)
    np.testing.assert_allclose(last[:, 0], full[np.arange(3), lens - 1], atol=1e-5, rtol=0)


def test_unknown_logits_mode_is_a_programming_error(exported_bundle):
    with DecoderSession(exported_bundle("llama")) as session:
        with pytest.raises(ValueError):
            session.step(session.new_cache(1, 4), np.array([[1]]), np.array([1]), logits="first")
