"""Codebook restriction: an image-token model whose vocabulary is shared with text (Emu3- or
Chameleon-style: text ids first, image token k is id T + k, logits over both) samples image
tokens only, fed back by their ids, with the VQ decoder reading codebook indices
(runtime/image_generate._codebook; the module is arx.export.image_modules with text_vocab)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from image_bundle import export_shared_vocab_c2i  # noqa: E402

from arx.export.image_modules import generate_cfg  # noqa: E402
from arx.manifest import read_manifest  # noqa: E402
from arx.plugins.sampling.reference import SamplingParams, sample_reference  # noqa: E402
from arx.runtime.decoder import DecoderSession  # noqa: E402
from arx.runtime.image_generate import ImageOptions, generate_images  # noqa: E402
from arx.runtime.sampler import SamplingOptions  # noqa: E402

TEXT, CODEBOOK, GRID, LABELS = 24, 16, 3, [0, 2, 1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return export_shared_vocab_c2i(tmp_path_factory.mktemp("shared"), TEXT, CODEBOOK, GRID)


def _cfg(logits, scale):
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


def test_manifest_says_where_the_codebook_lies(shared):
    _, bundle = shared
    m = read_manifest(bundle)
    assert m.extensions["image"]["codebook"] == {"offset": TEXT, "size": CODEBOOK}
    assert m.token_spaces["image"].size == CODEBOOK and m.vocab_size == TEXT + CODEBOOK


def test_greedy_tokens_equal_the_module_loop_restricted_to_the_codebook(shared):
    module, bundle = shared
    ref = generate_cfg(module, LABELS, 4.0, lambda k, x: _cfg(x, 4.0).argmax(-1)).numpy()
    with torch.no_grad():  # what an unrestricted argmax would pick first: text ids
        ids = torch.tensor(LABELS + [3] * 3)[:, None] + TEXT + CODEBOOK
        past = [(torch.zeros(6, 2, 0, 16),) * 2 for _ in range(2)]
        logits, _ = module(ids, torch.zeros(6, 1, dtype=torch.long), past)
    assert (_cfg(logits[:, -1], 4.0).argmax(-1) < TEXT).any()  # the restriction matters
    with DecoderSession(bundle) as session:
        got = generate_images(session, LABELS, ImageOptions(
            cfg_scale=4.0, sampling=SamplingOptions(do_sample=False)))
    np.testing.assert_array_equal(got.tokens.reshape(3, -1), ref)
    assert ref.max() < CODEBOOK  # codebook indices, what the VQ decoder reads


def test_seeded_sampling_over_the_codebook_is_reproducible_and_matches_the_spec(shared):
    module, bundle = shared
    params = SamplingParams(temperature=1.0, top_k=6, cfg_scale=3.0)

    def choose(k, x):  # image i: seed 5 + i as row 0 at offset 1 + k, over the codebook only
        x, b = x.numpy(), x.shape[0] // 2
        table = SamplingParams.table([params])
        return torch.tensor([int(sample_reference(x[[i, b + i]], table, np.zeros((1, CODEBOOK), bool),
                                                  [5 + i], [1 + k])[0]) for i in range(b)])
    ref = generate_cfg(module, LABELS, 3.0, choose).numpy()
    options = ImageOptions(cfg_scale=3.0, sampling=SamplingOptions(do_sample=True, top_k=6, seed=5))
    with DecoderSession(bundle) as session:
        a = generate_images(session, LABELS, options).tokens.reshape(3, -1)
        b = generate_images(session, LABELS, options).tokens.reshape(3, -1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, ref)


def test_jacobi_speculation_stays_in_the_codebook(shared):
    """--speculate jacobi on a shared vocabulary: the same greedy grid as plain decoding (its
    guesses fed back as ids offset + k, judged over the codebook's columns only)."""
    from arx.runtime.image_speculative import generate_images_jacobi

    _, bundle = shared
    options = ImageOptions(cfg_scale=4.0, sampling=SamplingOptions(do_sample=False))
    with DecoderSession(bundle) as session:
        plain = generate_images(session, LABELS, options)
        jacobi = generate_images_jacobi(session, LABELS, options, 3)
        sampled = generate_images_jacobi(session, LABELS, ImageOptions(
            cfg_scale=4.0, sampling=SamplingOptions(do_sample=True, seed=5)), 3)
    np.testing.assert_array_equal(jacobi.tokens, plain.tokens)
    assert sampled.tokens.max() < CODEBOOK
