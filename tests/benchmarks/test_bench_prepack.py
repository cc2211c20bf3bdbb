"""benchmarks/bench_prepack.py on a tiny bundle: both choices run in their own processes and
report the open, the prefill and every step width. Timings mean nothing here."""

from __future__ import annotations

import json

from bench_scripts import load_script


def test_both_choices_report_every_width(exported_bundle, tmp_path, capsys):
    out = tmp_path / "prepack.json"
    assert load_script("bench_prepack").main([str(exported_bundle("llama")), "--rounds", "1",
                                              "--steps", "1", "--prompt", "8",
                                              "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["prepack"] for r in rows] == [False, True]
    for r in rows:
        assert r["open_s"] > 0 and r["prefill_ms"] > 0 and r["peak_rss_gb"] > 0
        assert sorted(int(w) for w in r["step_ms_by_rows"]) == [1, 2, 5, 8]
    assert "prepack on" in capsys.readouterr().out
