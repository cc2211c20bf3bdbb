"""Smoke test of benchmarks/bench_export.py on the tiny shape, so the script cannot rot: one
arx run and one onnxruntime-genai builder run, the table, and nothing left behind. Timings
mean nothing here (README, "Big checkpoints": the real shapes are run by hand)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from bench_scripts import import_script


@pytest.fixture(scope="module")
def bench():
    return import_script("bench_export")


def test_tiny_run_measures_both_tools_and_cleans_up(bench, tmp_path, monkeypatch, capsys):
    runs = [("arx", "w4")]  # arx export --quantize w4 (plain exports: tests/export)
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        runs.append(("ort-genai", "int4"))
    monkeypatch.setattr(bench, "runs", lambda shape: runs)
    rows = bench.main(["--shape", "tiny", "--work", str(tmp_path), "--json",
                       str(tmp_path / "rows.json"), "--repeat", "2"])
    assert [(r["tool"], r["precision"]) for r in rows] == runs
    assert all(0 < r["peak_gb"] < r["budget_gb"] and r["seconds"] > 0 for r in rows)
    assert all(r["runs"] == 2 and r["spread_s"].count("-") == 1 for r in rows)  # "min-max"
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert "peak GB" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # checkpoint, outputs gone
