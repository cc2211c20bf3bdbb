"""benchmarks/bench_weight_copies.py at a small shape: every variant runs and gives the same bytes."""

from __future__ import annotations

from bench_scripts import load_script


def test_every_variant_runs_and_agrees(capsys):
    times = load_script("bench_weight_copies").main(["--rows", "64", "--cols", "48",
                                                     "--weights", "2", "--rounds", "2"])
    assert set(times) == {"torch", "numpy", "emitter", "reused"}
    assert all(len(runs) == 2 and min(runs) > 0 for runs in times.values())
    out = capsys.readouterr().out
    assert "numpy   median" in out and "2 weights of 64 x 48" in out
