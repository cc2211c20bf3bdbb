"""Smoke test of benchmarks/bench_image.py on the tiny Janus shape (one run): the script cannot
rot, arx's greedy tokens equal transformers' on the benchmark's own prompt, and the w4 bundle
arx calibrate makes of it gets its columns. Timings mean nothing here."""

from __future__ import annotations

import json

import pytest
from bench_scripts import import_script

pytest.importorskip("transformers")


@pytest.mark.slow
def test_smoke_tiny_shape(tmp_path):
    bench_image = import_script("bench_image")
    out = tmp_path / "image.json"
    assert bench_image.main(["--shape", "tiny", "--runs", "1", "--threads", "1", "--batch", "2",
                             "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["tokens_equal"] and row["batch"] == 2
    assert row["arx"]["token_loop_s"] > 0 and row["hf_eager"]["vq_decoder_s"] > 0
    assert row["arx_w4"]["token_loop_s"] > 0 and row["speedup_w4"] > 0
    assert 0 <= row["w4_greedy_token_agreement"] <= 1 and 0 <= row["w4_top1_agreement"] <= 1
