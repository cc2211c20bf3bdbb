"""Smoke test of benchmarks/bench_image.py on the tiny Janus shape (one run): the script cannot
rot, and arx's greedy tokens equal transformers' on the benchmark's own prompt. Timings mean
nothing here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_smoke_tiny_shape(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_image
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "image.json"
    assert bench_image.main(["--shape", "tiny", "--runs", "1", "--threads", "1", "--batch", "2",
                             "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["tokens_equal"] and row["batch"] == 2
    assert row["arx"]["token_loop_s"] > 0 and row["hf_eager"]["vq_decoder_s"] > 0
