"""Calibration and evaluation samples: token id sequences made from text with the bundle tokenizer.

    .txt   one sample per line (or, with chunk, the whole file tokenized at once, newlines and
           all, and cut into seq_len windows, each starting with BOS when the tokenizer adds one)
    .jsonl one JSON object per line, text under `text_field`
    random seeded random token ids (only when asked; the report says so)

Evaluation text is held out: `eval_path` when given, else the last samples of `path` (the
calibration set never sees them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arx.calibration.options import DataOptions
from arx.errors import ArxError
from arx.manifest import Manifest

MIN_TOKENS = 2  # a sample needs at least one next-token prediction


@dataclass
class Samples:
    calib: list[np.ndarray]  # each (S,) int64, 2 <= S <= seq_len
    eval: list[np.ndarray]
    source: dict  # what the report says about the data

    def fingerprint(self) -> str:
        """sha256 of the calibration token ids: a cache is only valid for the same tokens."""
        h = hashlib.sha256()
        for s in self.calib:
            h.update(np.asarray(s, dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()


def load_samples(bundle: Path, manifest: Manifest, opts: DataOptions, *, need_calib: int) -> Samples:
    """Read, tokenize and split the data; fail with one line when there is too little."""
    if not opts.random and not opts.path:
        raise ArxError("calibration needs data: pass --data FILE (.txt or .jsonl), "
                       "or --random for random token ids")
    if opts.random:
        return _random_samples(manifest, opts, need_calib)
    tokenizer = _tokenizer(bundle, manifest)
    seqs = sequences(Path(opts.path), tokenizer, opts)
    if opts.eval_path:
        eval_seqs = sequences(Path(opts.eval_path), tokenizer, opts)
        calib = seqs[: opts.samples]
        evals = eval_seqs[: opts.eval_samples]
    else:
        # hold out the tail: up to eval_samples, but never more than a quarter of the data
        n_eval = min(opts.eval_samples, max(1, len(seqs) // 4))
        calib, evals = seqs[: len(seqs) - n_eval][: opts.samples], seqs[len(seqs) - n_eval:]
    _check_counts(opts, len(calib), len(evals), need_calib)
    source = {"kind": "text", "path": str(opts.path), "format": _format(Path(opts.path)),
              "chunked": opts.chunk, "eval_path": str(opts.eval_path or opts.path),
              "eval_split": "file" if opts.eval_path else "tail of --data"}
    return Samples(calib, evals, source)


def read_texts(path: Path, text_field: str) -> list[str]:
    """Non-empty texts of a .txt (one per line) or .jsonl file."""
    raw = _read(path)
    if _format(path) == "jsonl":
        texts = _jsonl_texts(path, raw, text_field)
    else:
        texts = [line for line in raw.splitlines() if line.strip()]
    _check_not_empty(path, texts, text_field)
    return texts


def read_document(path: Path, text_field: str) -> str:
    """The whole text of a .txt file as it is (newlines kept), or a .jsonl file's texts one per line."""
    if _format(path) == "jsonl":
        return "\n".join(read_texts(path, text_field))
    raw = _read(path)
    _check_not_empty(path, [raw] if raw.strip() else [], text_field)
    return raw


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArxError(f"data file {path} does not exist; pass a .txt or .jsonl file with --data") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArxError(f"cannot read data file {path} ({type(e).__name__}: {e}); "
                       f"pass a readable UTF-8 .txt or .jsonl file") from None


def _check_not_empty(path: Path, texts: list[str], text_field: str) -> None:
    if not texts:
        raise ArxError(f"data file {path} has no text; give one sample per line "
                       f"(or JSONL objects with a {text_field!r} field)")


def _format(path: Path) -> str:
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "text"


def _jsonl_texts(path: Path, raw: str, field: str) -> list[str]:
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArxError(f"{path}:{n} is not JSON ({e.msg}); JSONL needs one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ArxError(f"{path}:{n} has no string field {field!r}; name the text field with --text-field")
        if obj[field].strip():
            texts.append(obj[field])
    return texts


def _tokenizer(bundle: Path, manifest: Manifest):
    from arx.runtime.tokenizer import Tokenizer

    if not manifest.tokenizer.file:
        raise ArxError(f"bundle {bundle} has no tokenizer to read text with; "
                       f"calibrate with --random token ids instead")
    return Tokenizer.from_bundle(bundle, manifest.tokenizer)


def sequences(path: Path, tokenizer, opts: DataOptions) -> list[np.ndarray]:
    """Token id sequences of one data file: a line (JSONL text) each, or whole-file windows."""
    if opts.chunk:
        # One encode of the whole text: tokenizing line by line and concatenating drops every
        # newline, which for code is its structure (and doubles its perplexity).
        seqs = _windows(tokenizer.encode(read_document(path, opts.text_field)), tokenizer, opts.seq_len)
    else:
        ids = tokenizer.encode_batch(read_texts(path, opts.text_field))
        seqs = [np.array(seq[: opts.seq_len], dtype=np.int64) for seq in ids]
    return [s for s in seqs if len(s) >= MIN_TOKENS]


def _windows(ids: list[int], tokenizer, seq_len: int) -> list[np.ndarray]:
    """Consecutive seq_len windows of `ids`; BOS (when the tokenizer adds one) starts each window,
    as it starts every prompt the runtime sees, so no window is scored as a mid-document start."""
    head = ids[:1] if tokenizer.add_bos else []
    body, step = ids[len(head):], seq_len - len(head)
    return [np.array(head + body[i: i + step], dtype=np.int64) for i in range(0, len(body), step)]


def _random_samples(manifest: Manifest, opts: DataOptions, need_calib: int) -> Samples:
    # Seeded and independent of anything else, so a rerun draws the same ids.
    rng = np.random.default_rng(opts.seed)
    n = max(opts.samples, need_calib)
    draw = lambda k: [rng.integers(0, manifest.vocab_size, opts.seq_len, dtype=np.int64)  # noqa: E731
                      for _ in range(k)]
    calib, evals = draw(n), draw(opts.eval_samples)
    return Samples(calib, evals, {"kind": "random token ids", "seed": opts.seed,
                                  "note": "random tokens: the accuracy numbers say little about real text"})


def _check_counts(opts: DataOptions, n_calib: int, n_eval: int, need_calib: int) -> None:
    if n_eval < 1:
        raise ArxError(f"no held-out samples of >= {MIN_TOKENS} tokens to evaluate on; "
                       f"add lines to {opts.eval_path or opts.path}")
    if n_calib < need_calib:
        raise ArxError(f"{n_calib} calibration samples in {opts.path} (after holding out {n_eval} "
                       f"for evaluation), but this method needs at least {need_calib}; add data, "
                       f"pass --eval-data, use --chunk, or use --method minmax")
