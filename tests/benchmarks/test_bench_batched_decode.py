"""Smoke test of benchmarks/bench_batched_decode.py (issue 11's batch-1 vs batch-8 decode check):
the machinery on the tiny shape, so the script cannot rot. Timings mean nothing here; the 125M
numbers are in README ("Measured") and docs/design.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import import_script


@pytest.fixture(scope="module")
def bench():
    return import_script("bench_batched_decode")


def test_tiny_run_times_each_variant_at_both_batches(bench, tmp_path, capsys):
    cache = tmp_path / "cache"
    rc = bench.main(["--shape", "tiny", "--variants", "w4,w4-level1", "--batch", "3",
                     "--prompt-len", "8", "--steps", "2", "--rounds", "2", "--ops",
                     "--cache-dir", str(cache), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "batch 1 vs 3" in out and "w4-level1" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["results"]) == {"w4", "w4-level1"}
    for r in report["results"].values():
        for kind in ("wall", "cpu"):
            x = r[kind]
            assert x["batch1_ms"] > 0 and x["batchB_ms"] > 0
            lo, hi = x["ratio_range"]
            assert lo <= x["ratio"] <= hi
    # each variant is its own calibrated bundle, with the accuracy level it names
    levels = {v: json.loads((Path(p) / "arx.json").read_text())["quantization"]["accuracy_level"]
              for v, p in report["bundles"].items()}
    assert levels == {"w4": 4, "w4-level1": 1}
    ops = report["ops"]["w4"]
    assert set(ops) == {"1", "3"} and "MatMulNBits" in ops["3"] and "GroupQueryAttention" in ops["3"]


@pytest.mark.parametrize("argv", [["--variants", "w4,w3"], ["--batch", "1"], ["--rounds", "0"]])
def test_bad_arguments_exit(bench, argv):
    with pytest.raises(SystemExit):
        bench.main(argv)
