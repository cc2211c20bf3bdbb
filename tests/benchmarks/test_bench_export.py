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


def test_optional_rows_run_only_when_named(bench, tmp_path, monkeypatch):
    """arx:w4-float-embedding (w4 with the token table float32, what w4 was) is a row of its
    own, run only when --only names it."""
    cmd = bench.command("arx", "w4-float-embedding", tmp_path / "ckpt", tmp_path / "out", 64)
    assert cmd[cmd.index("--quantize"):cmd.index("--quantize") + 4] == \
        ["--quantize", "w4", "--embedding", "float"]
    assert "--embedding" not in bench.command("arx", "w4", tmp_path / "c", tmp_path / "o", 64)
    w8 = bench.command("arx", "w8-float-embedding", tmp_path / "c", tmp_path / "o", 64)
    assert w8[w8.index("--quantize"):w8.index("--quantize") + 4] == \
        ["--quantize", "w8", "--embedding", "float"]
    measured = []
    monkeypatch.setattr(bench, "_measure", lambda cmd, *a: measured.append(cmd) or
                        {"seconds": 1.0, "spread_s": "-", "peak_gb": 0.1, "output_gb": 0.0,
                         "budget_gb": 1.0})
    monkeypatch.setattr(bench, "runs", lambda shape: [("arx", "w4")])
    assert [r["precision"] for r in bench.bench("tiny", tmp_path)] == ["w4"]
    rows = bench.bench("tiny", tmp_path, only={"arx:w4-float-embedding"})
    assert [r["precision"] for r in rows] == ["w4-float-embedding"]
    assert "--embedding" in measured[-1]
