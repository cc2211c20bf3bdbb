"""The embedded next-scale default, models/arx-var-digits: offline, it draws the digit asked for.

"Recognisable" is measured: the classifier scripts/train_var.py fitted on the real 12x12 digits
(in train_metrics.json) must read most generated digits as the class they were asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arx.cli import main
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.sampler import SamplingOptions
from arx.runtime.var_generate import VarOptions, VarStages, generate_var, var_info

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "arx-var-digits"
METRICS = json.loads((BUNDLE / "train_metrics.json").read_text())
ENOUGH = 0.75  # of the digits drawn at the bundle's defaults, read as the class asked for


def test_the_readme_command_writes_a_png(tmp_path, capsys):
    out = tmp_path / "three.png"
    assert main(["generate", str(BUNDLE), "--class", "3", "--image", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5 scales of 66 tokens" in capsys.readouterr().err


def _classify(pixels: np.ndarray) -> np.ndarray:
    (w1, b1), (w2, b2) = ([np.array(t, np.float32) for t in layer]
                          for layer in METRICS["classifier"]["layers"])
    hidden = np.maximum(pixels.reshape(len(pixels), -1) @ w1 + b1, 0.0)
    return (hidden @ w2 + b2).argmax(1)


@pytest.mark.parametrize("seed", [None, 0], ids=["greedy", "sampled"])
def test_default_settings_draw_the_asked_digit(seed):
    m = read_manifest(BUNDLE)
    info = var_info(m)
    labels = [c for c in range(10) for _ in range(1 if seed is None else 3)]
    sampling = SamplingOptions(do_sample=seed is not None, top_k=info.top_k, top_p=info.top_p,
                               seed=seed)
    with DecoderSession(BUNDLE) as session, VarStages(BUNDLE, m, info) as stages:
        pixels = generate_var(session, stages, labels, VarOptions(info.cfg_scale, sampling)).pixels
    hits = _classify(pixels) == np.array(labels)
    assert hits.mean() >= ENOUGH, f"classified as asked: {hits.mean():.0%} of {len(labels)}"
