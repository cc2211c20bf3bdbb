"""Smoke test of benchmarks/session_memory.py on the embedded default: one row per bundle with
its sizes, measured in a child process. The numbers mean nothing here."""

from __future__ import annotations

from pathlib import Path

from bench_scripts import import_script

ROOT = Path(__file__).resolve().parents[2]


def test_rows_for_each_bundle(tmp_path, capsys):
    from arx.export.exporter import ExportOptions, export_model

    bundle = tmp_path / "tiny.arx"
    export_model(source=ROOT / "models" / "arx-tiny", output=bundle,
                 options=ExportOptions(progress=False, check_parity=False))
    rows = import_script("session_memory").main([str(bundle), "--prompt-len", "8", "--steps", "2"])
    (row,) = rows
    assert row["bundle_bytes"] > 0 and row["peak"] >= row["anon"] > 0 and row["file"] >= 0
    assert "anon GB" in capsys.readouterr().out
