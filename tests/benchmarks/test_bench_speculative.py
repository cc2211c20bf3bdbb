"""Smoke test of benchmarks/train_speculative.py and bench_speculative.py: the whole machinery
on tiny shapes (3 training steps, one run of 16 tokens), so the scripts cannot rot. The timings
mean nothing here; an untrained model repeats itself, so every proposer is accepted a lot."""

from __future__ import annotations

import importlib.util
import json

import pytest
from bench_scripts import import_script


@pytest.fixture(scope="module")
def scripts():
    return import_script("train_speculative"), import_script("bench_speculative")


@pytest.mark.slow
def test_smoke_training_then_benchmark(scripts, tmp_path, capsys):
    train, bench = scripts
    models = tmp_path / "models"
    assert train.main(["--out", str(models), "--smoke", "--threads", "1"]) == 0
    a = json.loads((models / "target.arx" / "tokenizer.json").read_text())
    b = json.loads((models / "draft.arx" / "tokenizer.json").read_text())
    assert a == b  # one tokenizer: the draft passes arx's check
    engines = ["arx", "arx+draft", "arx+lookup", "hf", "hf+assistant", "hf+lookup"]
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        engines += ["ort-genai", "ort-genai+ngram"]
    out = tmp_path / "spec.json"
    assert bench.main(["--models", str(models), "--engines", ",".join(engines), "--runs", "1",
                       "--new-tokens", "16", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failed"] == {}
    for prompt in ("code", "story"):
        rows = report["results"][prompt]
        assert set(rows) == set(engines)
        for name in engines:  # greedy everywhere: every engine's tokens are arx plain's
            assert rows[name]["tokens"] == rows["arx"]["tokens"], (prompt, name)
        assert rows["arx+draft"]["speculation"]["method"] == "draft"
        assert rows["arx+lookup"]["speculation"]["proposed"] > 0
    table = capsys.readouterr().out
    assert "| code | arx+lookup |" in table and "arx+draft / arx" in table
