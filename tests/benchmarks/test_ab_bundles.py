"""Smoke test of benchmarks/ab_bundles.py: two sessions of one tiny bundle timed turn by turn
(the README's noise-floor measurement), so the script cannot rot. Timings mean nothing here."""

from __future__ import annotations

import json

from bench_scripts import import_script


def test_same_bundle_twice_times_each_session(exported_bundle, tmp_path, capsys):
    ab = import_script("ab_bundles")
    bundle = exported_bundle("llama")
    out = tmp_path / "ab.json"
    assert ab.main([str(bundle), str(bundle), "--runs", "2", "--new-tokens", "4",
                    "--prompt-len", "3", "--threads", "1", "--reverse", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["bundle"] for r in rows] == [str(bundle)] * 2
    assert all(len(r["tokens_per_s"]) == 2 and r["median"] > 0 for r in rows)
    assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_first"] > 0
    assert "x the first" in capsys.readouterr().out
