"""Smoke test of benchmarks/bench_image_speculative.py on the embedded image model (one run of
8 images): every configuration runs, the relaxed row carries its settings, and the quality
columns are filled. Timings mean nothing here."""

from __future__ import annotations

import json

from bench_scripts import import_script


def test_smoke_with_a_relaxed_row(tmp_path):
    bench = import_script("bench_image_speculative")
    out = tmp_path / "rows.json"
    assert bench.main(["--windows", "2,4", "--relax", "8,0.3", "--runs", "1", "--images", "8",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["plain", "jacobi:2", "jacobi:4",
                                           "jacobi:4 relax 8,0.3", "plain, other seeds"]
    assert rows[3]["relax"] == [8, 0.3] and rows[3]["acceptance"] is not None
    assert rows[0]["tv_vs_plain"] == 0.0 and all(0.0 <= r["classified"] <= 1.0 for r in rows)
