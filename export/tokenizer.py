"""Tokenizer stage: tokenizer.json (always, when the source has a tokenizer) + tokenizer.onnx (when
onnxruntime-extensions can express it), both checked against the HF tokenizer at export.

    source_dir ──AutoTokenizer──> HF fast tokenizer ──> bundle/tokenizer.json   (runtime: `tokenizers`)
                                                   └──> bundle/tokenizer.onnx   (ORT + ort-extensions)

Checks, on `check_texts` plus one text with the special tokens spelled out:
  HF ids == arx.runtime.tokenizer on the written tokenizer.json   else ArxError (the bundle would lie)
  HF ids == tokenizer.onnx through ORT + the custom-op library    else no tokenizer.onnx, reason kept
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from arx.errors import ArxError, require
from arx.manifest import TokenizerInfo

JSON_NAME = "tokenizer.json"
ONNX_NAME = "tokenizer.onnx"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # what arx serve's chat endpoint renders

# What a prompt can look like: plain ASCII, indented code, whitespace runs (spaces, tabs,
# newlines, CRLF, leading/trailing), CJK, emoji (incl. ZWJ sequences and flags), accents,
# digits and contractions, and the empty string.
DEFAULT_CHECK_TEXTS: tuple[str, ...] = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'k': [1, 2, 3]}  # comment\n",
    "a  b   c\t\td\n\n\ne\r\nf",
    "   leading and trailing spaces   ",
    " leading space",
    "\n",
    "你好，世界！日本語のテキスト。한국어",
    "emoji 🙂🚀 👍🏽 👩\u200d💻 🇫🇷",
    "Café naïve résumé façade Ångström",
    "don't I'LL we've 1234567 3.14159",
    "print(f'{x!r:>10}', arr[1:20]) # 42% (done)",
    "",
)

# Files whose presence means "this folder ships a tokenizer".
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "merges.txt", "vocab.txt", "spiece.model")


@dataclass(frozen=True)
class TokenizerExport:
    """What the tokenizer stage wrote into the bundle and what it measured."""

    json_file: str | None  # "tokenizer.json", or None when the source has no tokenizer
    onnx_file: str | None  # "tokenizer.onnx", or None (see onnx_skipped_reason)
    onnx_skipped_reason: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    add_bos: bool  # HF puts BOS in front when encoding with add_special_tokens=True
    checked_texts: int  # texts whose ids were compared (0 without a tokenizer)
    onnx_caveats: tuple[str, ...] = ()  # tolerated, documented differences of tokenizer.onnx
    onnx_tokenizer_class: str | None = None  # the ort-extensions behaviour that matched

    def info(self) -> TokenizerInfo:
        """The manifest's view of this export."""
        return TokenizerInfo(file=self.json_file, onnx_file=self.onnx_file, bos_token_id=self.bos_token_id,
                             eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                             add_bos=self.add_bos, onnx_skipped_reason=self.onnx_skipped_reason,
                             onnx_caveats=tuple(self.onnx_caveats))


def export_tokenizer(source_dir: Path, bundle_dir: Path, *,
                     check_texts: tuple[str, ...] = DEFAULT_CHECK_TEXTS) -> TokenizerExport:
    """Write tokenizer.json (+ tokenizer.onnx where possible) for the model in `source_dir`.

    `source_dir` is the HF checkpoint folder; for a model.pt file, its folder is searched.
    Without tokenizer files the export still succeeds (json_file=None): the bundle then only
    generates from `--prompt-ids`. Raises ArxError when the tokenizer cannot be loaded or the
    written tokenizer.json would not reproduce the HF ids.
    """
    source_dir, bundle_dir = Path(source_dir), Path(bundle_dir)
    if source_dir.is_file():
        source_dir = source_dir.parent
    gen = _read_json(source_dir / "generation_config.json")
    cfg = _read_json(source_dir / "config.json")
    if not any((source_dir / name).is_file() for name in _TOKENIZER_FILES):
        return TokenizerExport(None, None, f"no tokenizer files in {source_dir}", _first_id(gen, cfg, "bos"),
                               _eos_ids(gen, cfg, None), _first_id(gen, cfg, "pad"), False, 0)

    hf = _load_hf(source_dir)
    texts = list(check_texts) + _special_texts(hf)
    expected = [(t, _hf_ids(hf, t)) for t in texts]
    add_bos = _detect_add_bos(hf)
    bos = hf.bos_token_id if hf.bos_token_id is not None else _first_id(gen, cfg, "bos")
    pad = hf.pad_token_id if hf.pad_token_id is not None else _first_id(gen, cfg, "pad")
    eos = _eos_ids(gen, cfg, hf.eos_token_id)

    tok_str = _serialize(hf)
    (bundle_dir / JSON_NAME).write_text(tok_str, encoding="utf-8")
    _check_json(bundle_dir / JSON_NAME, expected, add_bos=add_bos, bos_token_id=bos)
    _write_chat_template(hf, bundle_dir)

    onnx = _export_onnx(hf, json.loads(tok_str), add_bos, expected, bundle_dir / ONNX_NAME)
    return TokenizerExport(
        json_file=JSON_NAME, onnx_file=ONNX_NAME if onnx.model is not None else None,
        onnx_skipped_reason=onnx.reason, bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad,
        add_bos=add_bos, checked_texts=len(texts), onnx_caveats=onnx.caveats,
        onnx_tokenizer_class=onnx.candidate.tokenizer_class if onnx.candidate else None)


def _load_hf(source_dir: Path):
    """The HF tokenizer as transformers loads it (no remote code); it must be tokenizers-backed."""
    transformers = require("transformers", "export", "exporting the tokenizer")
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(source_dir), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, ImportError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArxError(f"could not load the tokenizer in {source_dir} ({first}); save it as a fast "
                       f"tokenizer (tokenizer.json) with transformers' save_pretrained, or remove the "
                       f"tokenizer files and generate with --prompt-ids") from e
    if getattr(hf, "backend_tokenizer", None) is None:
        raise ArxError(f"the tokenizer in {source_dir} ({type(hf).__name__}) is not backed by the "
                       f"`tokenizers` library; convert it to tokenizer.json with "
                       f"AutoTokenizer.from_pretrained(...).save_pretrained(...) and export again")
    return hf


def _write_chat_template(hf, bundle_dir: Path) -> None:
    """The tokenizer's chat template, as its own file: tokenizer.json does not hold it."""
    template = getattr(hf, "chat_template", None)
    if isinstance(template, dict):  # named templates: the one HF uses without a name
        template = template.get("default")
    if isinstance(template, str) and template.strip():
        (bundle_dir / CHAT_TEMPLATE_NAME).write_text(template, encoding="utf-8")


def _hf_ids(hf, text: str) -> list[int]:
    return list(hf(text, add_special_tokens=True)["input_ids"])


def _detect_add_bos(hf) -> bool:
    """Does HF put BOS first? Measured, because transformers 5 decides it in several places."""
    with_sp = _hf_ids(hf, "Hello")
    without = list(hf("Hello", add_special_tokens=False)["input_ids"])
    prefix_len = len(with_sp) - len(without)
    if with_sp[prefix_len:] != without or with_sp[:prefix_len] not in ([], [hf.bos_token_id]):
        raise ArxError(f"the tokenizer adds special tokens arx cannot reproduce ({with_sp} vs {without} "
                       f"without special tokens; only a leading BOS is supported); "
                       f"generate with --prompt-ids instead")
    return prefix_len == 1


def _special_texts(hf) -> list[str]:
    # Special tokens typed into a prompt (chat templates do) must map to their ids, in all
    # three tokenizers, also at the very start where Metaspace adds no "▁" after them.
    parts = [t for t in (hf.bos_token, hf.eos_token) if t]
    return ["x" + "y".join(parts) + "z end", parts[0] + "start"] if parts else []


def _serialize(hf) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    # transformers sets truncation/padding per call; a checkpoint's tokenizer.json may carry
    # a fixed max_length that would silently cut long prompts in the runtime.
    tok.no_truncation()
    tok.no_padding()
    return tok.to_str(pretty=True)


def _check_json(path: Path, expected, *, add_bos: bool, bos_token_id: int | None) -> None:
    from arx.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_file(path, bos_token_id=bos_token_id, add_bos=add_bos)
    for text, ids in expected:
        got = tok.encode(text)
        if got != ids:
            raise ArxError(f"tokenizer.json does not reproduce the HF tokenizer on {text!r} "
                           f"(HF {ids[:16]}, tokenizer.json {got[:16]}); the tokenizer depends on "
                           f"Python code in transformers: re-save it with save_pretrained and check "
                           f"tokenizer.json, or generate with --prompt-ids")


def _export_onnx(hf, tok_json: dict, add_bos: bool, expected, out: Path):
    from arx.errors import MissingDependency
    from arx.export import tokenizer_onnx as tx

    try:
        ortx = require("onnxruntime_extensions", "export", "exporting tokenizer.onnx")
    except MissingDependency as e:  # tokenizer.json alone is a complete bundle: skip, don't fail
        return tx.OnnxResult(None, str(e))
    special = {k: getattr(hf, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    added = [t.content for t in hf.backend_tokenizer.get_added_tokens_decoder().values()]
    result = tx.find_model(tok_json, special, add_bos, expected, added, ortx.get_library_path())
    if result.model is not None:
        out.write_bytes(result.model.SerializeToString())
    return result


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArxError(f"{path} is not valid JSON ({e}); fix or remove it") from e


def _first_id(gen: dict, cfg: dict, kind: str) -> int | None:
    for src in (gen, cfg):
        value = src.get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def _eos_ids(gen: dict, cfg: dict, tokenizer_eos: int | None) -> tuple[int, ...]:
    """generation_config.json first (it lists every stop id, e.g. Llama 3's <|eot_id|>)."""
    for value in (gen.get("eos_token_id"), tokenizer_eos, cfg.get("eos_token_id")):
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list) and value:
            return tuple(int(v) for v in value)
    return ()
