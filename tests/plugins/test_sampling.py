"""arx::sample: spec semantics (HF rules), Philox reproducibility, Triton == reference ids."""

import numpy as np
import pytest

from arx.plugins.sampling.reference import (SamplingParams, kept_threshold, philox_uniform,
                                            presence_mask, processed_logits, sample_reference)


def rows(*params):
    return SamplingParams.table(list(params))


def draw(logits, params, presence=None, seeds=None, offsets=None):
    b, v = params.shape[0], logits.shape[1]
    presence = np.zeros((b, v), bool) if presence is None else presence
    seeds = np.arange(b, dtype=np.int64) + 11 if seeds is None else seeds
    offsets = np.zeros(b, np.int64) if offsets is None else offsets
    return sample_reference(logits, params, presence, seeds, offsets)


def test_greedy_is_argmax():
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_array_equal(draw(x, rows(*[SamplingParams(0.0)] * 3)), x.argmax(1))


def test_repetition_penalty_matches_hugging_face():
    x = np.array([[2.0, -2.0, 1.0, -1.0]], np.float32)
    seen = presence_mask(np.array([[0, 1, 1]]), [3], 4)  # duplicates count once, like HF
    got = processed_logits(x, rows(SamplingParams(repetition_penalty=2.0)), seen)
    # HF RepetitionPenaltyLogitsProcessor: score < 0 ? score * p : score / p
    np.testing.assert_allclose(got, [[1.0, -4.0, 1.0, -1.0]])


def test_guidance_formula():
    cond = np.array([[1.0, 3.0]], np.float32)
    uncond = np.array([[2.0, 0.5]], np.float32)
    got = processed_logits(np.concatenate([cond, uncond]), rows(SamplingParams(cfg_scale=4.0)),
                           np.zeros((1, 2), bool))
    np.testing.assert_allclose(got, uncond + 4.0 * (cond - uncond))


def hf_allowed(x, top_k, top_p):
    """Hugging Face's TopK then TopP warpers (sort based), as an independent spec check."""
    x = x.copy()
    if top_k:
        x[x < np.sort(x)[-top_k]] = -np.inf
    order = np.argsort(x)  # ascending
    probs = np.exp(x[order] - x.max())
    cum = np.cumsum(probs / probs.sum())
    remove = cum <= 1 - top_p
    remove[-1] = False
    x[order[remove]] = -np.inf
    return np.isfinite(x)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (20, 0.5), (1, 1.0)])
def test_top_k_top_p_support(top_k, top_p):
    x = np.random.default_rng(1).standard_normal((1, 300)).astype(np.float32) * 2
    allowed = hf_allowed(x[0], top_k, top_p)
    np.testing.assert_array_equal(x[0] >= kept_threshold(x[0], top_k, top_p), allowed)
    p = rows(SamplingParams(1.0, top_k=top_k, top_p=top_p))
    ids = {int(draw(x, p, seeds=np.array([s]))[0]) for s in range(200)}
    assert ids <= set(np.flatnonzero(allowed)) and len(ids) > min(1, allowed.sum() - 1)


def test_gumbel_draws_follow_softmax():
    x = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    ids = [int(draw(x, rows(SamplingParams()), seeds=np.array([s]))[0]) for s in range(3000)]
    freq = np.bincount(ids, minlength=3) / 3000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)  # ~3 sigma at n = 3000


def test_seed_and_offset_reproducible():
    a = philox_uniform(123, 7, 0, 1000)
    np.testing.assert_array_equal(a, philox_uniform(123, 7, 0, 1000))
    assert not np.array_equal(a, philox_uniform(123, 8, 0, 1000))
    assert not np.array_equal(a, philox_uniform(124, 7, 0, 1000))
    assert 0.0 <= a.min() and a.max() < 1.0 and abs(a.mean() - 0.5) < 0.03


def test_row_term_replaces_the_row_index():
    """row[b] is the counter's last word: the default is b; zeros draw each row as it draws
    alone (row 0 of a batch of one), whatever its place in the batch."""
    x = np.random.default_rng(2).standard_normal((3, 200)).astype(np.float32)
    p = rows(*[SamplingParams(1.0, top_k=50)] * 3)
    seeds, offsets, zeros = np.array([4, 5, 6]), np.array([2, 2, 9]), np.zeros(3, np.int64)
    presence = np.zeros((3, 200), bool)
    alone = [int(draw(x[b:b + 1], p[b:b + 1], seeds=seeds[b:b + 1], offsets=offsets[b:b + 1])[0])
             for b in range(3)]
    assert sample_reference(x, p, presence, seeds, offsets, zeros).tolist() == alone
    np.testing.assert_array_equal(draw(x, p, seeds=seeds, offsets=offsets),
                                  sample_reference(x, p, presence, seeds, offsets, np.arange(3)))
    same = np.tile(x[:1], (3, 1))  # one seed, one offset: only the row term tells rows apart
    ids = [sample_reference(same, p, presence, np.full(3, 7), np.full(3, n), np.arange(3))
           for n in range(10)]
    assert any(len(set(i.tolist())) > 1 for i in ids)


def test_philox_matches_triton(torch, triton):
    import triton.language as tl

    @triton.jit
    def uniforms(OUT, seed, offset, row, V, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        r0, _, _, _ = tl.philox(seed, i, (offset & 0xFFFFFFFF).to(tl.uint32),
                                ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32), i * 0 + row)
        tl.store(OUT + i, tl.random.uint_to_uniform_float(r0), mask=i < V)

    out = torch.zeros(100)
    uniforms[(1,)](out, 2**40 + 3, 2**33 + 5, 2, 100, BLOCK=128)
    np.testing.assert_array_equal(out.numpy(), philox_uniform(2**40 + 3, 2**33 + 5, 2, 100))


SETTINGS = [SamplingParams(0.0), SamplingParams(0.7, top_k=40),
            SamplingParams(1.0, top_p=0.9, repetition_penalty=1.3, cfg_scale=3.0),
            SamplingParams(1.3, top_k=200, top_p=0.6, repetition_penalty=0.8)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("guidance", [False, True])
def test_triton_matches_reference(torch, triton, dtype, guidance):
    from arx.plugins.sampling.triton_kernel import sample

    rng = np.random.default_rng(5)
    b, v = len(SETTINGS), 2500  # not a multiple of the 1024 tile
    t_logits = torch.from_numpy(rng.standard_normal((2 * b if guidance else b, v)) * 3)
    t_logits = t_logits.to(getattr(torch, dtype))
    logits = t_logits.to(torch.float32).numpy()  # the reference sees the same rounded values
    params = SamplingParams.table(SETTINGS)
    presence = rng.random((b, v)) < 0.05
    # step 0: the default row term (the row index); step 1: zeros, a repeat, a 64-bit one
    for step, row in enumerate([None, np.array([0, 0, 3, 2**32 + 1])]):
        seeds, offsets = np.array([1, 2, 3, 2**40 + 7]), np.array([0, 5, 2**33, 9]) + step
        want = sample_reference(logits, params, presence, seeds, offsets, row)
        got = sample(t_logits, *(torch.from_numpy(a) for a in (params, presence, seeds,
                                                               offsets)),
                     row=None if row is None else torch.from_numpy(row))
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(got.numpy(), want)
