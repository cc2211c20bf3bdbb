"""The embedded image default, models/arx-digits: offline, it draws the digit it is asked for.

"Recognisable" is measured, not only eyeballed: a classifier fitted on the real digits
(train_metrics.json, written by scripts/train_digits.py) must read most generated digits as the
class they were asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arx.cli import main
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.image_generate import ImageOptions, decode_pixels, generate_images, image_info
from arx.runtime.sampler import SamplingOptions

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "arx-digits"
METRICS = json.loads((BUNDLE / "train_metrics.json").read_text())


def test_the_readme_command_writes_a_png(tmp_path, capsys):
    out = tmp_path / "seven.png"
    assert main(["generate", str(BUNDLE), "--class", "7", "--image", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 images of 16 tokens" in capsys.readouterr().err


def _classify(pixels: np.ndarray) -> np.ndarray:
    """The digit the script's classifier (256 -> 64 ReLU -> 10, fitted on the real digits)
    sees in each (B, 1, 16, 16) image."""
    (w1, b1), (w2, b2) = ([np.array(t, np.float32) for t in layer]
                          for layer in METRICS["classifier"]["layers"])
    hidden = np.maximum(pixels.reshape(len(pixels), -1) @ w1 + b1, 0.0)
    return (hidden @ w2 + b2).argmax(1)


@pytest.mark.parametrize("sampling", [SamplingOptions(do_sample=False),
                                      SamplingOptions(do_sample=True, seed=0)],
                         ids=["greedy", "sampled"])
def test_default_settings_draw_the_asked_digit(sampling):
    m = read_manifest(BUNDLE)
    info = image_info(m)
    labels = [c for c in range(10) for _ in range(3 if sampling.do_sample else 1)]
    options = ImageOptions(cfg_scale=info.cfg_scale, sampling=SamplingOptions(
        **{**vars(sampling), "top_k": info.top_k, "temperature": info.temperature}))
    with DecoderSession(BUNDLE) as session:
        result = generate_images(session, labels, options)
    pixels = decode_pixels(BUNDLE, info, m, result.tokens)
    hits = _classify(pixels) == np.array(labels)
    assert hits.mean() >= 0.8, f"classified as asked: {hits.mean():.0%} of {len(labels)}"
