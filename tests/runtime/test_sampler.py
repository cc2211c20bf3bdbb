"""The host sampler: Hugging Face's processor semantics, and the same ids as arx::sample's spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from arx.errors import ArxError
from arx.plugins.sampling.reference import sample_reference
from arx.runtime.sampler import Sampler, SamplingOptions, kept_threshold

V = 50


def logits(seed=0, batch=4):
    return np.random.default_rng(seed).normal(0, 3, size=(batch, V)).astype(np.float32)


def at(n, batch=4):
    return np.full(batch, n, np.int64)


def test_greedy_is_argmax():
    x = logits()
    assert (Sampler(SamplingOptions(), V)(x, None, at(0)) == x.argmax(-1)).all()


def test_repetition_penalty_matches_hf():
    x = logits(1)
    seen_ids = torch.tensor([[1, 4, 7], [2, 2, 9], [0, 49, 3], [5, 6, 8]])
    seen = np.zeros((4, V), dtype=bool)
    np.put_along_axis(seen, seen_ids.numpy(), True, axis=1)
    hf = RepetitionPenaltyLogitsProcessor(1.7)(seen_ids, torch.from_numpy(x.copy())).numpy()
    ours = Sampler(SamplingOptions(repetition_penalty=1.7), V)
    assert (ours(x, seen, at(3)) == hf.argmax(-1)).all()


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.05)])
def test_support_after_top_k_top_p_matches_hf(top_k, top_p):
    x = logits(2)
    t = torch.from_numpy(x.copy() / 0.7)
    if top_k:
        t = TopKLogitsWarper(top_k)(None, t)
    if top_p < 1:
        t = TopPLogitsWarper(top_p)(None, t)
    hf_support = torch.isfinite(t).numpy()
    scaled = x / np.float32(0.7)
    ours = np.stack([row >= kept_threshold(row, top_k, top_p) for row in scaled])
    assert (ours == hf_support).all()


SETTINGS = [dict(temperature=0.7, top_k=40), dict(top_p=0.9, repetition_penalty=1.3),
            dict(temperature=1.3, top_k=200, top_p=0.6, repetition_penalty=0.8),
            dict(temperature=1.0)]


@pytest.mark.parametrize("kwargs", SETTINGS)
@pytest.mark.parametrize("vocab, ties", [(2500, False), (300, True)])
def test_same_ids_as_the_arx_sample_spec(kwargs, vocab, ties):
    """The runtime's vectorised sampler picks exactly the ids of the plugin's reference."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, vocab)) * 3).astype(np.float32)
    if ties:  # integer-valued logits: many ties at the top-k / top-p thresholds
        x = np.round(x)
    seen = rng.random((3, vocab)) < 0.05
    options = SamplingOptions(do_sample=True, seed=2**40 + 5, **kwargs)
    sampler = Sampler(options, vocab)
    params = np.tile(options.params().row(), (3, 1))
    for offset in (0, 7, 2**33):
        offsets = np.array([offset, offset + 1, 5], np.int64)
        want = sample_reference(x, params, seen, np.full(3, sampler.seed), offsets)
        np.testing.assert_array_equal(sampler(x, seen, offsets), want)


def test_sampling_is_seeded_by_seed_and_position():
    x = logits(3)
    opts = SamplingOptions(do_sample=True, temperature=0.8, top_k=4, seed=123)
    a, b = Sampler(opts, V), Sampler(opts, V)
    np.testing.assert_array_equal(a(x, None, at(5)), b(x, None, at(5)))
    # the draw depends on the position, not on how many calls came before
    b(x, None, at(9))
    np.testing.assert_array_equal(a(x, None, at(6)), b(x, None, at(6)))
    top4 = np.argsort(-x, axis=-1)[:, :4]
    draws = np.stack([a(x, None, at(n)) for n in range(50)])
    assert all(draws[n, r] in top4[r] for n in range(50) for r in range(4))
    assert len({tuple(d) for d in draws}) > 1


def test_row_terms_choose_what_a_draw_depends_on():
    """rows = the Philox row term per row, as arx::sample's `row` input: zeros draw every row
    as it draws alone (a batch of one, row 0); the default is each row's index."""
    x = logits(4, batch=3)
    sampler = Sampler(SamplingOptions(do_sample=True, seed=8), V)
    offsets = np.array([3, 9, 4], np.int64)
    alone = [int(sampler(x[b:b + 1], None, offsets[b:b + 1])[0]) for b in range(3)]
    zeros = np.zeros(3, np.int64)
    assert sampler(x, None, offsets, rows=zeros).tolist() == alone
    params = np.tile(sampler.options.params().row(), (3, 1))
    want = sample_reference(x, params, np.zeros((3, V), bool), np.full(3, 8), offsets, zeros)
    np.testing.assert_array_equal(sampler(x, None, offsets, rows=zeros), want)
    np.testing.assert_array_equal(sampler(x, None, offsets),
                                  sampler(x, None, offsets, rows=np.arange(3)))
    draws = [sampler(np.tile(x[:1], (3, 1)), None, at(n, 3)) for n in range(20)]
    assert any(len(set(d.tolist())) > 1 for d in draws)  # arange: one seed, distinct noise


def test_fresh_seed_when_none_given():
    opts = SamplingOptions(do_sample=True)
    assert Sampler(opts, V).seed != Sampler(opts, V).seed


def test_sampling_follows_the_distribution():
    x = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    s = Sampler(SamplingOptions(do_sample=True, seed=0), 3)
    counts = np.bincount([int(s(x, None, at(n, 1))[0]) for n in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_guidance_rows_are_mixed():
    cond, uncond = logits(5, 2), logits(6, 2)
    greedy = Sampler(SamplingOptions(), V)
    np.testing.assert_array_equal(greedy(np.concatenate([cond, uncond]), None, at(0, 2)),
                                  cond.argmax(-1))  # cfg_scale 1: the conditional logits


def test_temperature_matches_hf():
    x = logits(4)
    hf = TemperatureLogitsWarper(0.5)(None, torch.from_numpy(x.copy())).numpy()
    np.testing.assert_allclose(x / 0.5, hf, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=-1), dict(top_k=-2),
                                    dict(top_p=0), dict(top_p=1.01), dict(repetition_penalty=0),
                                    dict(seed=-1)])
def test_invalid_values_rejected(kwargs):
    with pytest.raises(ArxError):
        SamplingOptions(**kwargs)
