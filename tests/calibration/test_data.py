"""Calibration data: text lines, JSONL, whole-file chunking, the held-out split."""

from __future__ import annotations

import json

import numpy as np

from arx.calibration.data import _to_sequences, load_samples, read_texts
from arx.calibration.options import DataOptions
from arx.manifest import read_manifest


def fake_encode(texts):
    return [[len(w) for w in t.split()] for t in texts]


def test_jsonl_and_text(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in ["a b c", "", "d e"]) + "\n\n")
    assert read_texts(jl, "body") == ["a b c", "d e"]
    txt = tmp_path / "d.txt"
    txt.write_text("one two\n\n  \nthree four five\n")
    assert read_texts(txt, "text") == ["one two", "three four five"]


def test_chunking_and_truncation():
    texts = ["a bb ccc dddd", "e ff"]
    per_line = _to_sequences(texts, fake_encode, DataOptions(path="x", seq_len=3))
    assert [s.tolist() for s in per_line] == [[1, 2, 3], [1, 2]]
    chunks = _to_sequences(texts, fake_encode, DataOptions(path="x", seq_len=4, chunk=True))
    assert [s.tolist() for s in chunks] == [[1, 2, 3, 4], [1, 2]]


def test_held_out_split_never_overlaps(llama_bundle, calib_text):
    m = read_manifest(llama_bundle)
    s = load_samples(llama_bundle, m, DataOptions(path=str(calib_text), samples=100, eval_samples=5), need_calib=4)
    assert len(s.eval) == 5 and len(s.calib) == 43  # 48 lines, the last 5 held out
    assert all(x.dtype == np.int64 and x[0] == m.tokenizer.bos_token_id for x in s.calib + s.eval)
    again = load_samples(llama_bundle, m, DataOptions(path=str(calib_text), samples=100, eval_samples=5), need_calib=4)
    assert again.fingerprint() == s.fingerprint()
