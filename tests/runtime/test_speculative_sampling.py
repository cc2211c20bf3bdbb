"""Speculative sampling follows the target's distribution: the rejection rule on hand-set
distributions, then whole generations of a 16-token model with a draft and with prompt lookup,
against the target's exact distribution of the sampled tokens.

Each statistical test is Pearson's chi-square at significance ALPHA = 0.001 with fixed seeds
(so its outcome is deterministic; a correct rule fails it with probability 0.001 over seeds),
cells with an expected count under 5 pooled into one. Each also checks its power: the same
samples against the draft's distribution (what a broken rule would follow) are rejected.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import numpy as np
import pytest

from arx.plugins.sampling import reference
from arx.runtime.decoder import DecoderSession
from arx.manifest import read_manifest
from arx.runtime.generate import GenerateOptions, generate
from arx.runtime.proposers import open_proposer
from arx.runtime.sampler import Sampler, SamplingOptions
from arx.runtime.speculative import (SpeculationStats, SpeculativeOptions, accept_uniforms,
                                     generate_speculative, judge)

ALPHA = 1e-3
VOCAB = 16
SAMPLING = SamplingOptions(do_sample=True, temperature=0.9, top_k=12, repetition_penalty=1.2)


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom >= x): 1 - the regularized lower incomplete
    gamma P(df/2, x/2), by its power series (no scipy here)."""
    a, z = df / 2, x / 2
    if z <= 0:
        return 1.0
    term = total = 1 / a
    n = 0
    while term > total * 1e-16:
        n += 1
        term *= z / (a + n)
        total += term
    return max(0.0, 1.0 - math.exp(-z + a * math.log(z) - math.lgamma(a)) * total)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of observed counts against cell probabilities (any shape)."""
    counts, probs = counts.ravel().astype(float), probs.ravel()
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0  # a sample where the distribution has no mass
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def test_chi2_sf_matches_closed_forms():
    for x in (0.5, 3.0, 12.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
        # df = 1: P(|N(0,1)| >= sqrt(x))
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)


@pytest.mark.parametrize("opts", [SamplingOptions(do_sample=True),
                                  SamplingOptions(do_sample=True, temperature=0.7, top_k=9),
                                  SamplingOptions(do_sample=True, top_p=0.6,
                                                  repetition_penalty=1.4),
                                  SamplingOptions(do_sample=False, repetition_penalty=1.4)])
def test_probs_is_the_distribution_the_sampler_draws_from(opts):
    """Sampler.probs == softmax over the reference's kept set (its own threshold loop); greedy:
    one-hot at the reference's argmax."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 40)).astype(np.float32)
    logits[0, [3, 7]] = logits[0].max() + 1  # a tie at the top
    seen = rng.random((6, 40)) < 0.2
    got = Sampler(opts, 40).probs(logits, seen)
    params = np.tile(opts.params().row(), (6, 1))
    x = reference.processed_logits(logits, params, seen)
    for b in range(6):
        if not opts.do_sample:
            assert got[b].argmax() == np.argmax(x[b]) and got[b].max() == 1.0
            continue
        xb = (x[b] / np.float32(opts.temperature)).astype(np.float32)
        keep = xb >= reference.kept_threshold(xb, opts.top_k, opts.top_p)
        want = np.where(keep, np.exp(xb - xb.max()), 0.0)
        np.testing.assert_allclose(got[b], want / want.sum(), rtol=1e-6, atol=1e-12)


def test_uniforms_are_the_references_philox_draws():
    """One vectorised call == philox_uniform row by row, stream-tagged offsets included."""
    from arx.runtime.sampler import uniforms
    from arx.runtime.speculative import ACCEPT_STREAM, RESIDUAL_STREAM

    offsets = np.array([0, 7, (1 << 40) + 3, 9 | ACCEPT_STREAM, 9 | RESIDUAL_STREAM])
    rows = np.array([0, 3, 1, 2, 2])
    got = uniforms(123, offsets, rows, 50)
    for r in range(len(rows)):
        np.testing.assert_array_equal(got[r], reference.philox_uniform(123, int(offsets[r]),
                                                                       int(rows[r]), 50))
    assert len({got[3, 0], got[4, 0]}) == 2  # the two streams draw differently


Q = np.array([0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.12, 0.08])  # target
P = np.array([0.05, 0.30, 0.20, 0.10, 0.05, 0.25, 0.05, 0.0])  # draft


@pytest.mark.parametrize("proposal", ["draft", "point mass"])
def test_rejection_rule_emits_the_target_distribution(proposal):
    """d ~ p (or a fixed token, as lookup proposes), then judge(): the emitted token ~ q."""
    n, seed = 20000, 11
    rng = np.random.default_rng(5)
    out, rows = np.empty(n, np.int64), np.arange(n) % 3
    u = accept_uniforms(seed, np.arange(n), rows)
    for pos in range(n):
        d = int(rng.choice(8, p=P)) if proposal == "draft" else 5
        p = P if proposal == "draft" else np.eye(8)[5]
        token = judge(Q, p, d, u[pos], seed, pos, int(rows[pos]))
        out[pos] = d if token < 0 else token
    counts = np.bincount(out, minlength=8)
    assert chi2_pvalue(counts, Q) > ALPHA, counts
    assert chi2_pvalue(counts, P if proposal == "draft" else np.eye(8)[5]) < ALPHA  # power


# ------------------------------------------------------------------ whole generations, V = 16
def _tiny_llama(folder, seed: int, noise_of=None):
    import torch
    import transformers as tf
    from arx.export.exporter import ExportOptions, export_model

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, initializer_range=0.2)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    if noise_of is not None:  # the draft: the target with noise, so they agree often
        model = copy.deepcopy(noise_of)
        with torch.no_grad():
            for w in model.parameters():
                w.add_(0.3 * w.std().nan_to_num(0) * torch.randn(w.shape))
    model.save_pretrained(folder / "hf")
    export_model(source=folder / "hf", output=folder / "m.arx",
                 options=ExportOptions(progress=False))
    return folder / "m.arx", model


@pytest.fixture(scope="module")
def v16(tmp_path_factory):
    """(target bundle, draft bundle) of a 16-token vocabulary."""
    target, model = _tiny_llama(tmp_path_factory.mktemp("v16-target"), 0)
    draft, _ = _tiny_llama(tmp_path_factory.mktemp("v16-draft"), 1, noise_of=model)
    return target, draft


def _exact(bundle, prompt, n: int) -> np.ndarray:
    """The joint distribution (V,) * n of the first n sampled tokens under `bundle` with
    SAMPLING, by enumerating every prefix (prefill of all V^i prefixes at once)."""
    sampler = Sampler(SAMPLING, VOCAB)
    joint = np.ones(())
    with DecoderSession(bundle) as s:
        for i in range(n):
            prefixes = np.array(list(itertools.product(range(VOCAB), repeat=i)),
                                np.int64).reshape(VOCAB ** i, i)  # (V^i, i)
            rows = len(prefixes)
            ids = np.hstack([np.tile(prompt, (rows, 1)), prefixes]).astype(np.int64)
            cache = s.new_cache(rows, ids.shape[1])
            logits = s.step(cache, ids, np.full(rows, ids.shape[1]), logits="last")[:, 0]
            cache.close()
            seen = np.zeros((rows, VOCAB), bool)
            for j in range(ids.shape[1]):
                seen[np.arange(rows), ids[:, j]] = True
            cond = sampler.probs(logits, seen).reshape((VOCAB,) * i + (VOCAB,))
            joint = joint[..., None] * cond
    return joint


def _samples(bundle, proposer_of, prompt, n: int, spec, seeds: range, batch: int = 64):
    """(runs * batch, n) tokens of speculative generations, each row an independent draw."""
    out, stats = [], SpeculationStats("sum")
    with DecoderSession(bundle) as session:
        for seed in seeds:
            options = GenerateOptions(max_new_tokens=n, stop_on_eos=False,
                                      sampling=dataclasses.replace(SAMPLING, seed=seed))
            with proposer_of() as proposer:
                r = generate_speculative(session, proposer, [prompt] * batch, options, spec)
            out.extend(r.tokens)
            stats.proposed += r.speculation.proposed
            stats.accepted += r.speculation.accepted
    return np.array(out), stats


def _counts(tokens: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.bincount(np.ravel_multi_index(tokens[:, axes].T, (VOCAB,) * len(axes)),
                       minlength=VOCAB ** len(axes))


def _marginal(joint: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return joint.sum(axis=tuple(i for i in range(joint.ndim) if i not in axes)).ravel()


def _proposer(target, **kind):
    return lambda: open_proposer(read_manifest(target), target, **kind)


# tokens 2 and 3 come from the first verify step (kept proposals or residual draws), 4 from a
# bonus draw or the next step; token 1 is the prefill's plain draw
MARGINALS = [(1, 2), (3,), (0, 3)]


@pytest.mark.parametrize("method", ["draft", "lookup"])
def test_speculative_sampling_follows_the_target(method, v16):
    target, draft = v16
    with DecoderSession(target) as session:  # the target's own greedy text: what lookup finds
        # in it is likely under the target, so both branches of the rule run often
        prompt = [1] + generate(session, [[1]], GenerateOptions(max_new_tokens=30,
                                                                stop_on_eos=False)).tokens[0]
    proposer_of = _proposer(target, **({"draft": draft} if method == "draft" else {"lookup": 2}))
    tokens, stats = _samples(target, proposer_of, prompt, 4, SpeculativeOptions(k=2), range(60))
    assert stats.accepted > 300 and stats.proposed - stats.accepted > 300, stats.to_json()
    joint = _exact(target, prompt, 4)
    other = _exact(draft, prompt, 4)
    for axes in MARGINALS:
        counts = _counts(tokens, axes)
        assert chi2_pvalue(counts, _marginal(joint, axes)) > ALPHA, (method, axes)
    # power: the draft's distribution differs enough that these samples reject it
    assert min(chi2_pvalue(_counts(tokens, a), _marginal(other, a)) for a in MARGINALS) < ALPHA


def test_seeded_speculative_sampling_is_reproducible(v16):
    target, draft = v16
    runs = [_samples(target, _proposer(target, draft=draft), [1, 5, 3], 12,
                     SpeculativeOptions(adaptive=True),
                     range(3, 5), batch=3)[0] for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
