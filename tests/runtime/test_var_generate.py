"""Next-scale generation on the bundle equals the module's own PyTorch loop, scale by scale.

The reference is TinyVAR.generate (tests/var_model.py: VAR's autoregressive_infer_cfg with the
doubled batch [cond; null], guidance (1 + t) cond - t uncond with t = cfg k / (S - 1), the
module's cache growing by concatenation). Greedy: argmax of the mixed logits. Seeded: each
image's positions drawn by the arx::sample specification itself (plugins/sampling/reference.py,
a different face than the host sampler the loop uses), its n positions as rows, cond then
null twins, seed + image, offsets = the positions. Pixels within PIXEL_ATOL of the module's.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_lines import assert_one_line

from arx.plugins.sampling.reference import SamplingParams, sample_reference
from arx.runtime.decoder import DecoderSession
from arx.runtime.sampler import SamplingOptions
from arx.runtime.var_generate import VarOptions, VarStages, generate_var, var_info

PIXEL_ATOL = 1e-4  # the bundle's f_hat through ORT against the module's, pixels in [-1, 1]
GREEDY = SamplingOptions(do_sample=False)


@pytest.fixture(scope="module")
def var(var_export):
    module, bundle = var_export
    with DecoderSession(bundle) as session, \
            VarStages(bundle, session.manifest, var_info(session.manifest)) as stages:
        yield module, bundle, session, stages


def _run(var, classes, cfg, sampling=GREEDY):
    _, _, session, stages = var
    return generate_var(session, stages, classes, VarOptions(cfg, sampling))


@pytest.mark.parametrize("classes", [[7], [1, 4, 9]])
@pytest.mark.parametrize("cfg", [0.0, 3.0])
def test_greedy_tokens_of_every_scale_equal_the_module(var, classes, cfg):
    module = var[0]
    got = _run(var, classes, cfg)
    ref, pixels = module.generate(classes, cfg=cfg)
    for k, (a, b) in enumerate(zip(got.tokens, ref)):
        assert np.array_equal(a.reshape(len(classes), -1), b.numpy()), f"scale {k}"
    assert np.abs(got.pixels - pixels.numpy()).max() <= PIXEL_ATOL


def test_guidance_changes_the_tokens(var):
    """The null rows are used: CFG 3 and no CFG give different maps for the same classes."""
    a, b = _run(var, [1, 4, 9], 0.0), _run(var, [1, 4, 9], 3.0)
    assert any(not np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))


def _spec_choose(seeds, sampling: SamplingOptions):
    """choose() for TinyVAR.generate drawing each image by the arx::sample reference."""
    cols = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                          top_p=sampling.top_p)
    pos = {"at": 0}

    def choose(si, logits, t):
        b, n = logits.shape[0] // 2, logits.shape[1]
        params = SamplingParams(cols.temperature, cols.top_k, cols.top_p, 1.0, 1.0 + t).row()
        out = torch.empty(b, n, dtype=torch.long)
        for i in range(b):
            rows = torch.cat([logits[i], logits[b + i]]).numpy()
            out[i] = torch.from_numpy(sample_reference(
                rows, np.tile(params, (n, 1)), np.zeros((n, rows.shape[1]), bool),
                np.full(n, seeds[i]), pos["at"] + np.arange(n)).astype(np.int64))
        pos["at"] += n
        return out

    return choose


def test_seeded_sampling_is_arx_sample_per_position_and_reproducible(var):
    module = var[0]
    sampling = SamplingOptions(do_sample=True, top_k=8, top_p=0.9, seed=5)
    got = _run(var, [2, 6], 4.0, sampling)
    ref, _ = module.generate([2, 6], cfg=4.0, choose=_spec_choose([5, 6], sampling))
    for k, (a, b) in enumerate(zip(got.tokens, ref)):
        assert np.array_equal(a.reshape(2, -1), b.numpy()), f"scale {k}"
    again = _run(var, [2, 6], 4.0, sampling)
    assert all(np.array_equal(a, b) for a, b in zip(got.tokens, again.tokens))
    # image 1 (seed 6) drawn alone is the same image as in the batch
    alone = _run(var, [6], 4.0, SamplingOptions(do_sample=True, top_k=8, top_p=0.9, seed=6))
    assert all(np.array_equal(a[1], b[0]) for a, b in zip(got.tokens, alone.tokens))
    other = _run(var, [2, 6], 4.0, SamplingOptions(do_sample=True, top_k=8, top_p=0.9, seed=7))
    assert any(not np.array_equal(a, b) for a, b in zip(got.tokens, other.tokens))


def _arx(*args, cwd):
    return subprocess.run([sys.executable, "-m", "arx", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def test_cli_writes_the_png_and_json(var, tmp_path):
    bundle = var[1]
    proc = _arx("generate", bundle, "--class", 3, "--image", tmp_path / "out.png", "--cfg", 4,
                "--top-k", 8, "--top-p", 0.95, "--seed", 0, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    png = (tmp_path / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    out = json.loads(proc.stdout)
    assert [len(t) for t in out["images"][0]["tokens"]] == [1, 2, 3, 4, 6]
    assert len(out["scale_step_s"]) == 5


@pytest.mark.parametrize("flags, fragment", [
    (["--class", 10], "outside the bundle's 10 classes"),
    (["--class", 1, "--cfg", -1], "--cfg must be >= 0"),
    (["--class", 1, "--cfg-schedule", "linear"], "--cfg-schedule does not apply"),
    (["--class", 1, "--max-new-tokens", 4], "--max-new-tokens"),
    (["--prompt", "hi"], "a prompt does not apply"),
    (["--class", 1, "--top-p", 0], "--top-p must be in (0, 1]"),
])
def test_bad_input_one_line_nothing_written(var, tmp_path, flags, fragment):
    proc = _arx("generate", var[1], *flags, "--image", tmp_path / "x.png", cwd=tmp_path)
    assert_one_line(proc, fragment)
    assert list(tmp_path.iterdir()) == []


def test_profile_times_every_scale(var, tmp_path):
    out = tmp_path / "profile.json"
    proc = _arx("profile", var[1], "--batch", "1,2", "--runs", 1, "--warmup", 0, "--json", out,
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1x1      2x2      3x3      4x4      6x6" in proc.stdout
    import json

    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    assert all(len(r["scale_step_s"]) == 5 and r["images_per_s"] > 0 for r in report["rows"])
    refused = _arx("profile", var[1], "--compare", var[1], cwd=tmp_path)
    assert_one_line(refused, "--compare does not apply to a next-scale bundle")
