"""Tokenizer export: HF ids == tokenizer.json ids == tokenizer.onnx ids, and the failure paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_extensions")



import tokenizer_fixtures as fx  # tests/ is on sys.path (pyproject pythonpath)

from arx.errors import ArxError  # noqa: E402
from arx.export import tokenizer as tk  # noqa: E402
from arx.export import tokenizer_onnx as tx  # noqa: E402
from arx.runtime.tokenizer import Tokenizer  # noqa: E402

# What ort-extensions 0.15.2 can express, as measured: the Unigram kernel collapses whitespace
# runs the way SentencePiece's normalizer does, which a tokenizer.json without that normalizer
# does not, so its tokenizer.onnx is skipped.
ONNX_EXPECTED = {"gpt2": True, "llama": True, "qwen2": True, "unigram": False}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok_sources")
    return {name: make(root / name) for name, make in fx.KINDS.items()}


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory) -> dict[str, tuple[Path, tk.TokenizerExport]]:
    out = {}
    for name, src in sources.items():
        bundle = tmp_path_factory.mktemp(f"bundle_{name}")
        out[name] = (bundle, tk.export_tokenizer(src, bundle))
    return out


def _onnx_ids(path: Path, texts: list[str]) -> list[list[int]]:
    import onnx
    import onnxruntime_extensions

    sess = tx.session(onnx.load(str(path)), onnxruntime_extensions.get_library_path())
    return [tx.run_ids(sess, t) for t in texts]


@pytest.mark.parametrize("kind", list(fx.KINDS))
def test_ids_identical_hf_json_onnx(kind, sources, exported):
    from transformers import AutoTokenizer

    bundle, result = exported[kind]
    hf = AutoTokenizer.from_pretrained(str(sources[kind]))
    texts = list(tk.DEFAULT_CHECK_TEXTS) + tk._special_texts(hf)
    want = [hf(t)["input_ids"] for t in texts]

    assert result.json_file == "tokenizer.json" and result.checked_texts == len(texts)
    runtime = Tokenizer.from_bundle(bundle, result.info())
    assert [runtime.encode(t) for t in texts] == want

    assert (result.onnx_file is not None) == ONNX_EXPECTED[kind], result.onnx_skipped_reason
    if result.onnx_file:
        assert result.onnx_skipped_reason is None
        assert _onnx_ids(bundle / result.onnx_file, texts) == want
    else:
        assert not (bundle / "tokenizer.onnx").exists()
        assert "differs at token" in result.onnx_skipped_reason


def test_special_token_metadata(exported):
    gpt2, llama, qwen2 = (exported[k][1] for k in ("gpt2", "llama", "qwen2"))
    assert (gpt2.add_bos, gpt2.bos_token_id, gpt2.eos_token_ids) == (False, 0, (0,))
    assert (llama.add_bos, llama.bos_token_id, llama.eos_token_ids) == (True, 1, (2,))
    assert (qwen2.add_bos, qwen2.bos_token_id, qwen2.pad_token_id) == (False, None, 0)
    # Qwen2's NFC normalizer is the one difference the op tolerates, and it is reported.
    assert any("NFC" in c for c in qwen2.onnx_caveats)


def test_onnx_graph_takes_a_batch(exported):
    bundle, result = exported["gpt2"]
    import onnx
    import onnxruntime_extensions

    sess = tx.session(onnx.load(str(bundle / result.onnx_file)), onnxruntime_extensions.get_library_path())
    texts = ["Hello world!", "def f(x):\n    return x\n"]
    out = sess.run([tx.OUTPUT], {tx.INPUT: np.array(texts, dtype=object)})[0]
    runtime = Tokenizer.from_bundle(bundle, result.info())
    assert out.shape[0] == 2
    for row, text in zip(out.tolist(), texts):
        ids = runtime.encode(text)
        assert row[:len(ids)] == ids


def test_eos_ids_from_generation_config(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["llama"], src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert tk.export_tokenizer(src, bundle).eos_token_ids == (2, 7)


def test_no_tokenizer_files(tmp_path):
    src, bundle = tmp_path / "src", tmp_path / "bundle"
    src.mkdir()
    bundle.mkdir()
    (src / "config.json").write_text(json.dumps({"bos_token_id": 6, "eos_token_id": 7}))
    result = tk.export_tokenizer(src, bundle)
    assert result.json_file is None and result.onnx_file is None and result.onnx_skipped_reason
    assert (result.bos_token_id, result.eos_token_ids, result.checked_texts) == (6, (7,), 0)
    assert list(bundle.iterdir()) == []
    with pytest.raises(ArxError, match="--prompt-ids"):
        Tokenizer.from_bundle(bundle, result.info())


@pytest.mark.parametrize("make, reason", [(fx.make_lowercase_bpe, "Lowercase"),
                                          (fx.make_wordpiece, "WordPiece")])
def test_inexpressible_tokenizer_skips_onnx_only(make, reason, tmp_path):
    from transformers import AutoTokenizer

    src, bundle = make(tmp_path / "src"), tmp_path / "bundle"
    bundle.mkdir()
    result = tk.export_tokenizer(src, bundle)
    assert result.onnx_file is None and reason in result.onnx_skipped_reason
    assert not (bundle / "tokenizer.onnx").exists()
    hf = AutoTokenizer.from_pretrained(str(src))
    runtime = Tokenizer.from_bundle(bundle, result.info())
    assert all(runtime.encode(t) == hf(t)["input_ids"] for t in tk.DEFAULT_CHECK_TEXTS)


def test_onnx_mismatch_skips_with_first_text(sources, tmp_path, monkeypatch):
    real = tx.run_ids
    monkeypatch.setattr(tx, "run_ids", lambda sess, text: real(sess, text) + [5])
    result = tk.export_tokenizer(sources["gpt2"], tmp_path)
    assert result.onnx_file is None and not (tmp_path / "tokenizer.onnx").exists()
    assert repr(tk.DEFAULT_CHECK_TEXTS[0]) in result.onnx_skipped_reason
    assert result.json_file == "tokenizer.json"


def test_json_mismatch_raises_one_line(sources, tmp_path, monkeypatch):
    real = tk._hf_ids
    monkeypatch.setattr(tk, "_hf_ids", lambda hf, text: real(hf, text) + ([9] if "fib" in text else []))
    with pytest.raises(ArxError) as err:
        tk.export_tokenizer(sources["gpt2"], tmp_path)
    assert "tokenizer.json does not reproduce" in str(err.value) and "\n" not in str(err.value)


def test_missing_ort_extensions_skips_onnx(sources, tmp_path, monkeypatch):
    from arx.errors import MissingDependency

    def missing(module, extra, purpose):
        raise MissingDependency(module, extra, purpose)

    monkeypatch.setattr(tk, "require", lambda m, e, p: missing(m, e, p) if "extensions" in m else __import__(m))
    result = tk.export_tokenizer(sources["gpt2"], tmp_path)
    assert result.json_file and result.onnx_file is None
    assert "pip install 'arx[export]'" in result.onnx_skipped_reason


def test_broken_tokenizer_fails_clearly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{ not json")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    with pytest.raises(ArxError, match="could not load the tokenizer"):
        tk.export_tokenizer(src, tmp_path)


def test_slow_vocab_files_are_converted(sources, tmp_path):
    """A GPT-2 folder with only vocab.json + merges.txt: transformers 5 builds the fast tokenizer."""
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    src.mkdir()
    model = json.loads((sources["gpt2"] / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (src / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    result = tk.export_tokenizer(src, bundle)
    hf = AutoTokenizer.from_pretrained(str(src))
    runtime = Tokenizer.from_bundle(bundle, result.info())
    assert result.onnx_file == "tokenizer.onnx"
    assert all(runtime.encode(t) == hf(t)["input_ids"] for t in tk.DEFAULT_CHECK_TEXTS)
