"""The image loop with classifier-free guidance equals the module's own PyTorch loop.

The reference is LlamaGen's generate in PyTorch (arx.export.image_modules.generate_cfg: prefill
[cond; null], decode [tok; tok], the module's growing cache), choosing each token by argmax of
uncond + s (cond - uncond), or, seeded, by the arx::sample specification itself
(plugins/sampling/reference.py: a different face than the host sampler the loop uses) for each
image with its own seed, as row 0, at the token's position.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_bundle import CODEBOOK, GRID

from arx.errors import ArxError
from arx.export.image_modules import generate_cfg
from arx.plugins.sampling.reference import SamplingParams, sample_reference
from arx.runtime.decoder import DecoderSession
from arx.runtime.image_generate import ImageOptions, generate_images
from arx.runtime.sampler import SamplingOptions

LABELS = [0, 3, 4]  # batch 3: 6 rows with the null class


@pytest.fixture(scope="module")
def c2i(c2i_export):
    module, bundle = c2i_export
    with DecoderSession(bundle) as session:
        yield module, session


def _greedy(scale_at):
    def choose(k, logits):
        cond, uncond = logits.chunk(2)
        return (uncond + scale_at(k) * (cond - uncond)).argmax(-1)
    return choose


def _seeded(seed, params_at):
    """Each image b drawn by the reference with seed + b as row 0 at offset 1 + k."""
    def choose(k, logits):
        x, b = logits.numpy(), logits.shape[0] // 2
        table = SamplingParams.table([params_at(k)])
        return torch.tensor([int(sample_reference(x[[i, b + i]], table, np.zeros((1, CODEBOOK), bool),
                                                  [seed + i], [1 + k])[0]) for i in range(b)])
    return choose


def _arx(session, labels, **kw):
    got = generate_images(session, labels, ImageOptions(**kw))
    assert got.tokens.shape == (len(labels), GRID, GRID)
    return got.tokens.reshape(len(labels), -1)


@pytest.mark.parametrize("scale", [4.0, 0.0])
def test_greedy_cfg_batch_3_equals_the_module_loop(c2i, scale):
    module, session = c2i
    ref = generate_cfg(module, LABELS, scale, _greedy(lambda k: scale)).numpy()
    got = _arx(session, LABELS, cfg_scale=scale, sampling=SamplingOptions(do_sample=False))
    np.testing.assert_array_equal(got, ref)


def test_guidance_changes_the_image(c2i):
    """Not a vacuous check: with these weights the scale decides tokens."""
    _, session = c2i
    greedy = SamplingOptions(do_sample=False)
    assert not np.array_equal(_arx(session, LABELS, cfg_scale=4.0, sampling=greedy),
                              _arx(session, LABELS, cfg_scale=1.0, sampling=greedy))


def test_seeded_top_k_top_p_cfg_batch_3_equals_the_module_loop(c2i):
    module, session = c2i
    sampling = SamplingOptions(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=11)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, cfg_scale=3.0)
    ref = generate_cfg(module, LABELS, 3.0, _seeded(11, lambda k: params)).numpy()
    got = _arx(session, LABELS, cfg_scale=3.0, sampling=sampling)
    np.testing.assert_array_equal(got, ref)
    again = _arx(session, LABELS, cfg_scale=3.0, sampling=sampling)  # reproducible
    np.testing.assert_array_equal(again, got)


def test_linear_schedule_follows_the_token_index(c2i):
    module, session = c2i
    n = GRID * GRID
    options = ImageOptions(cfg_scale=5.0, cfg_schedule="linear")
    assert options.scale_at(0, n) == 1.0 and options.scale_at(n - 1, n) == 5.0
    ref = generate_cfg(module, LABELS, 5.0, _greedy(lambda k: options.scale_at(k, n))).numpy()
    got = _arx(session, LABELS, cfg_scale=5.0, cfg_schedule="linear",
               sampling=SamplingOptions(do_sample=False))
    np.testing.assert_array_equal(got, ref)


def test_an_image_does_not_depend_on_its_batch(c2i):
    """Image i of a batch seeded s is the lone image seeded s + i."""
    _, session = c2i
    sampling = SamplingOptions(do_sample=True, seed=5)
    batch = _arx(session, [3, 1, 3], sampling=sampling)
    alone = _arx(session, [3], sampling=SamplingOptions(do_sample=True, seed=7))
    np.testing.assert_array_equal(batch[2], alone[0])
    assert not np.array_equal(batch[0], batch[2])  # other seeds, other images


def test_cfg_1_runs_no_null_rows_and_equals_the_conditional_model(c2i):
    module, session = c2i
    rows = []
    real = session.new_cache
    session.new_cache = lambda b, n: rows.append(b) or real(b, n)
    try:
        got = _arx(session, LABELS, cfg_scale=1.0, sampling=SamplingOptions(do_sample=False))
    finally:
        del session.new_cache
    assert rows == [len(LABELS)]
    ref = generate_cfg(module, LABELS, 1.0, _greedy(lambda k: 1.0)).numpy()
    np.testing.assert_array_equal(got, ref)


def test_bad_options_and_classes(c2i):
    _, session = c2i
    with pytest.raises(ArxError, match="--cfg must be >= 0"):
        ImageOptions(cfg_scale=-1.0)
    with pytest.raises(ArxError, match="outside the bundle's 5 classes"):
        generate_images(session, [5], ImageOptions())
