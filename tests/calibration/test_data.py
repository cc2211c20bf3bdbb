"""Calibration data: text lines, JSONL, whole-file chunking, the held-out split."""

from __future__ import annotations

import json

import numpy as np

from arx.calibration.data import load_samples, read_texts, sequences
from arx.calibration.options import DataOptions
from arx.manifest import read_manifest


class FakeTokenizer:
    """One id per word (its length) and 100 per newline, BOS 7 in front, like a real tokenizer."""

    add_bos, bos_token_id = True, 7

    def encode(self, text):
        return [self.bos_token_id, *(100 if w == "\n" else len(w) for w in text.replace("\n", " \n ").split(" ") if w)]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_jsonl_and_text(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in ["a b c", "", "d e"]) + "\n\n")
    assert read_texts(jl, "body") == ["a b c", "d e"]
    txt = tmp_path / "d.txt"
    txt.write_text("one two\n\n  \nthree four five\n")
    assert read_texts(txt, "text") == ["one two", "three four five"]


def test_chunking_and_truncation(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("a bb ccc dddd\n\ne ff\n")
    per_line = sequences(data, FakeTokenizer(), DataOptions(path="x", seq_len=3))
    assert [s.tolist() for s in per_line] == [[7, 1, 2], [7, 1, 2]]
    # the whole file at once: its newlines (100) stay; BOS starts every window
    chunks = sequences(data, FakeTokenizer(), DataOptions(path="x", seq_len=4, chunk=True))
    assert [s.tolist() for s in chunks] == [[7, 1, 2, 3], [7, 4, 100, 100], [7, 1, 2, 100]]


def test_chunks_keep_the_files_newlines(llama_bundle, tmp_path):
    from arx.runtime.tokenizer import Tokenizer

    code = "def f(x):\n    if x:\n        return 1\n\n    return 2\n" * 6
    data = tmp_path / "code.txt"
    data.write_text(code)
    m = read_manifest(llama_bundle)
    tok = Tokenizer.from_bundle(llama_bundle, m.tokenizer)
    s = load_samples(llama_bundle, m, DataOptions(path=str(data), chunk=True, seq_len=16, eval_samples=1),
                     need_calib=0)
    windows = s.calib + s.eval
    assert all(w[0] == m.tokenizer.bos_token_id and len(w) <= 16 for w in windows)
    body = [t for w in windows for t in w[1:].tolist()]
    assert body == tok.encode(code)[1:]  # one encode of the whole file, cut into windows
    assert tok.decode(body) == code


def test_held_out_split_never_overlaps(llama_bundle, calib_text):
    m = read_manifest(llama_bundle)
    s = load_samples(llama_bundle, m, DataOptions(path=str(calib_text), samples=100, eval_samples=5), need_calib=4)
    assert len(s.eval) == 5 and len(s.calib) == 43  # 48 lines, the last 5 held out
    assert all(x.dtype == np.int64 and x[0] == m.tokenizer.bos_token_id for x in s.calib + s.eval)
    again = load_samples(llama_bundle, m, DataOptions(path=str(calib_text), samples=100, eval_samples=5), need_calib=4)
    assert again.fingerprint() == s.fingerprint()
