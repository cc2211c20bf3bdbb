"""Speculative Jacobi decoding of image tokens (runtime/image_speculative.py) on the embedded
image model, models/arx-digits (16 tokens, 64 codes, CFG 3, top-k 8).

Greedy: the grid is token for token generate_images'. Sampling: every token follows the
guided distribution exactly; checked against the exact marginals of the first tokens,
computed by enumerating the model's own distributions.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from arx.cli import main
from arx.runtime.decoder import DecoderSession
from arx.runtime.image_generate import ImageOptions, generate_images, image_info
from arx.runtime.image_speculative import generate_images_jacobi
from arx.runtime.sampler import Sampler, SamplingOptions
from tests.runtime.test_speculative_sampling import ALPHA, chi2_pvalue

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "arx-digits"


@pytest.fixture(scope="module")
def session():
    with DecoderSession(BUNDLE) as s:
        yield s


def _options(cfg: float, **sampling) -> ImageOptions:
    return ImageOptions(cfg_scale=cfg, sampling=SamplingOptions(**sampling))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("window", [1, 4, 15])
def test_greedy_grid_is_plain_greedy(session, cfg, window):
    options = _options(cfg, do_sample=False)
    classes = [0, 3, 7]
    plain = generate_images(session, classes, options)
    jacobi = generate_images_jacobi(session, classes, options, window)
    np.testing.assert_array_equal(jacobi.tokens, plain.tokens)
    stats = jacobi.speculation
    assert stats.produced == len(classes) * 15  # every token after the prefill's
    assert stats.target_steps <= 15 and stats.tokens_per_target_step >= 1.0


def test_seeded_sampling_reproduces(session):
    options = _options(3.0, do_sample=True, top_k=8, seed=11)
    a = generate_images_jacobi(session, [7, 7], options, 6)
    b = generate_images_jacobi(session, [7, 7], options, 6)
    c = generate_images_jacobi(session, [7, 7], replace(options, sampling=replace(
        options.sampling, seed=12)), 6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.speculation.accepted > 0  # guesses are kept: the method does speculate


def _exact_marginals(session, cls: int, options: ImageOptions, positions: int) -> list:
    """The exact distribution of tokens 0 .. positions-1 (each marginal, (V,)) by enumerating
    every prefix the top-k keeps, through the model's own plain steps."""
    info = image_info(session.manifest)
    n = info.tokens
    sampler = lambda k: Sampler(replace(options.sampling, cfg_scale=options.scale_at(k, n)),
                                session.manifest.vocab_size)
    prefixes, weights, out = [[]], np.ones(1), []
    for k in range(positions):
        rows = len(prefixes)
        cache = session.new_cache(2 * rows, 1 + k)
        ids = np.array([[cls + info.class_offset] + p for p in prefixes] +
                       [[info.null_class + info.class_offset] + p for p in prefixes], np.int64)
        logits = session.step(cache, ids, np.full(2 * rows, 1 + k), logits="last")[:, 0]
        cache.close()
        p = np.stack([sampler(k).probs(logits[[r, rows + r]], None, rows=1)[0]
                      for r in range(rows)])  # (prefixes, V)
        joint = weights[:, None] * p
        out.append(joint.sum(0))
        keep = np.argwhere(joint > 1e-4)  # prefixes that matter for the next marginal
        prefixes = [prefixes[r] + [int(t)] for r, t in keep]
        weights = joint[joint > 1e-4]
    return out


def test_sampled_tokens_follow_the_exact_distribution(session):
    """Chi-square goodness of fit of tokens 1 and 2 (judged guesses, residual and bonus draws
    all contribute there) at significance 0.001 per token, 480 images from fixed seeds."""
    options = _options(3.0, do_sample=True, top_k=8, seed=0)
    exact = _exact_marginals(session, 7, options, 3)
    grids = [generate_images_jacobi(session, [7] * 120, replace(options, sampling=replace(
        options.sampling, seed=1000 * s)), 4).tokens.reshape(120, -1) for s in range(4)]
    tokens = np.concatenate(grids)
    for k in (1, 2):
        counts = np.bincount(tokens[:, k], minlength=exact[k].size)
        probs = exact[k] / exact[k].sum()  # the enumeration drops paths under 1e-4
        assert chi2_pvalue(counts, probs) > ALPHA, k


def test_cli_jacobi_reports_speculation(tmp_path, capsys):
    out = tmp_path / "seven.png"
    assert main(["generate", str(BUNDLE), "--class", "7", "--image", str(out), "--json",
                 "--speculate", "jacobi:4", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["speculation"]["method"] == "jacobi"
    assert report["speculation"]["proposed"] > 0


@pytest.mark.parametrize("flag, fragment", [
    ("jacobi:0", "needs W >= 1"), ("jacobi:x", "takes a number of guesses"),
])
def test_cli_refuses_bad_windows(flag, fragment, tmp_path, capsys):
    code = main(["generate", str(BUNDLE), "--class", "7", "--image", str(tmp_path / "a.png"),
                 "--speculate", flag])
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
