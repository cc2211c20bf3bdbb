"""Smoke test of benchmarks/bench_var_quantized.py (one scheme, one sampled digit of each class):
the script cannot rot, and the quantized digits model still draws digits the classifier reads."""

from __future__ import annotations

import json

import pytest
from bench_scripts import import_script



@pytest.mark.slow
def test_smoke_one_scheme(tmp_path):
    bench_var_quantized = import_script("bench_var_quantized")
    out = tmp_path / "rows.json"
    assert bench_var_quantized.main(["--schemes", "w8", "--sampled", "1", "--no-plot",
                                     "--json", str(out)]) == 0
    fp32, w8 = json.loads(out.read_text())
    assert (fp32["bundle"], w8["bundle"]) == ("fp32", "w8")
    assert fp32["greedy_read_as_asked"] >= 0.9 and w8["greedy_read_as_asked"] >= 0.8
    assert w8["gate_passed"] and 0 < w8["greedy_token_agreement"] <= 1
