"""Greedy generation through the bundle is token-identical to Hugging Face `generate`."""

from __future__ import annotations

import pytest
from greedy_runs import arx_greedy, hf_greedy

PROMPTS = [[1, 17, 33, 99, 5, 12, 80, 41, 7], [1, 64, 3], [1, 150, 20, 20, 9, 31]]


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_identical_to_hf_generate(family, batch, hf_model_dir, exported_bundle):
    _, model = hf_model_dir(family)
    prompts = PROMPTS[:batch]
    expected = hf_greedy(model, prompts)
    got = arx_greedy(exported_bundle(family), prompts)
    for b in range(batch):
        assert got[b] == expected[b], f"{family} seq {b}: first diff at " \
            f"{next(i for i, (x, y) in enumerate(zip(got[b], expected[b])) if x != y)}"


def test_batch_rows_equal_single_runs(exported_bundle):
    """Per-sequence lengths in the cache: a batch gives each row what it gives alone."""
    bundle = exported_bundle("llama")
    batched = arx_greedy(bundle, PROMPTS)
    for b, p in enumerate(PROMPTS):
        assert arx_greedy(bundle, [p])[0] == batched[b]


def test_parity_recorded_in_manifest(family, exported_bundle):
    from arx.manifest import read_manifest

    parity = read_manifest(exported_bundle(family)).parity
    assert parity["passed"] is True
    for name, stats in parity["outputs"].items():
        assert stats["max_abs"] < 1e-4, name
    assert {"logits/prefill", "logits/decode", "present.key"} <= set(parity["outputs"])
