"""Smoke test of benchmarks/bench_var.py on the tiny VAR shape (one run): the script cannot
rot, and arx's greedy CFG tokens of every scale equal the eager module's (the script refuses
otherwise); the raster row beside it runs, and the w8a8 bundle arx calibrate makes of the
exported one. Timings mean nothing here."""

from __future__ import annotations

import json

import pytest
from bench_scripts import import_script


@pytest.mark.slow
def test_smoke_tiny_shape(tmp_path):
    bench_var = import_script("bench_var")
    out = tmp_path / "var.json"
    assert bench_var.main(["--shape", "tiny", "--runs", "1", "--threads", "1", "--batch", "2",
                           "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["batch"] == 2 and len(row["arx_scale_step_s"]) == 5
    assert row["eager_s_per_image"] > 0 and row["arx_s_per_image"] > 0 and row["speedup"] > 0
    # the raster row: the image-token model of the same grid (6x6 = 36 steps), run by arx
    assert row["raster_steps"] == 36 and row["raster_s_per_image"] > 0 and row["vs_raster"] > 0
    assert row["raster_parameters"] > 0
    assert row["arx_w8a8_s_per_image"] > 0 and 0 < row["w8a8_greedy_token_agreement"] <= 1
    assert 0 < row["w8a8_top1_agreement"] <= 1 and "w8a8_ppl_increase" in row
