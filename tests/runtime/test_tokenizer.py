"""Runtime tokenizer: encode == HF, decode == HF, streamed pieces concatenate to decode(ids)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from arx.errors import ArxError
from arx.manifest import TokenizerInfo
from arx.runtime.tokenizer import StreamDecoder, Tokenizer

pytest.importorskip("transformers")

TEXTS = [
    "Hello world! The quick brown fox.",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1)\n",
    "   spaces   and\ttabs\t\tand\n\nnewlines  ",
    "你好，世界！日本語のテキスト。",
    "emoji 🙂🚀 👍🏽 👩\u200d💻 🇫🇷 done",
    "Café naïve résumé Ångström",
    "mixed 中文 and 🙂 in one line é",
    "",
]


def _fixtures():
    import tokenizer_fixtures  # tests/ is on sys.path (pyproject pythonpath)

    return tokenizer_fixtures

@pytest.fixture(scope="module")
def tokenizers_by_kind(tmp_path_factory):
    """kind -> (HF tokenizer, runtime Tokenizer read from an exported bundle)."""
    from transformers import AutoTokenizer

    from arx.export.tokenizer import export_tokenizer

    out = {}
    for name, make in _fixtures().KINDS.items():
        src = make(tmp_path_factory.mktemp(f"src_{name}"))
        bundle = tmp_path_factory.mktemp(f"bundle_{name}")
        info = export_tokenizer(src, bundle, check_texts=()).info()
        out[name] = (AutoTokenizer.from_pretrained(str(src)), Tokenizer.from_bundle(bundle, info))
    return out


KINDS = ["gpt2", "llama", "qwen2", "unigram"]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_decode_equal_hf(kind, tokenizers_by_kind):
    hf, tok = tokenizers_by_kind[kind]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def _stream(tok: Tokenizer, ids) -> list[str]:
    dec = tok.stream()
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("kind", KINDS)
def test_stream_concatenation_equals_decode(kind, tokenizers_by_kind):
    _, tok = tokenizers_by_kind[kind]
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        # A piece never ends in half a character.
        assert not any(p.endswith("\ufffd") for p in pieces), pieces


@pytest.mark.parametrize("kind", KINDS)
def test_stream_random_ids(kind, tokenizers_by_kind):
    """Sampled ids split characters and spaces anywhere: the contract still holds.

    Byte-fallback tokens (<0xXX>) are left out: random bytes make invalid UTF-8, and the
    ByteFallback decoder turns a whole invalid run (valid bytes in it too) into U+FFFD, which a
    stream cannot take back. Byte-level tokens stay in: that decoder replaces only bad bytes.
    """
    _, tok = tokenizers_by_kind[kind]
    # sorted: get_vocab() comes from a hash map whose order changes from process to process
    pool = sorted(i for t, i in tok.backend.get_vocab().items()
                  if not (t.startswith("<0x") and len(t) == 6))
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.choice(pool, size=40).tolist()
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_stream_holds_back_split_emoji(tokenizers_by_kind):
    _, tok = tokenizers_by_kind["gpt2"]
    ids = tok.encode("🙂")
    assert len(ids) > 1  # byte-level: the emoji's 4 bytes are several tokens here
    pieces = _stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "🙂"


def test_stream_decodes_a_small_window(tokenizers_by_kind):
    _, tok = tokenizers_by_kind["llama"]
    lengths = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tok.backend, name)

        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return tok.backend.decode(ids, **kw)

    spy = Tokenizer(Spy(), bos_token_id=tok.bos_token_id, add_bos=tok.add_bos)
    ids = tok.encode(" ".join(TEXTS) * 4)
    assert len(ids) > 200
    dec = StreamDecoder(spy)
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == tok.decode(ids)
    assert max(lengths) <= 16


def test_skip_special_tokens(tokenizers_by_kind):
    _, tok = tokenizers_by_kind["llama"]
    ids = tok.encode("Hello") + list(tok.eos_token_ids)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == "Hello" == "".join(_stream(tok, ids))
    assert "</s>" in tok.decode(ids, skip_special_tokens=False)


def test_bundle_without_tokenizer(tmp_path):
    with pytest.raises(ArxError, match="--prompt-ids"):
        Tokenizer.from_bundle(tmp_path, TokenizerInfo(file=None))
    with pytest.raises(ArxError, match="re-export"):
        Tokenizer.from_bundle(tmp_path, TokenizerInfo(file="tokenizer.json"))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ArxError, match="not a valid tokenizer.json"):
        Tokenizer.from_bundle(tmp_path, TokenizerInfo(file="tokenizer.json"))


def test_runtime_tokenizer_imports_neither_torch_nor_transformers():
    code = ("import sys, arx.runtime.tokenizer; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
