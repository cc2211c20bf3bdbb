"""The runtime tokenizer: a thin layer over `tokenizers` reading the bundle's tokenizer.json.

Imports only the `tokenizers` library (no torch, no transformers) so it runs on an edge device.
The exporter checked that `Tokenizer.encode` gives the HF tokenizer's ids on a fixed set of texts,
using this very class, so what ships is what was checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from arx.errors import ArxError

_REPLACEMENT = "\ufffd"  # what byte-level/byte-fallback decoders emit for an incomplete UTF-8 sequence
# A UTF-8 character has at most 4 bytes, so a byte-level tokenizer completes it within 4 tokens;
# past this many held-back tokens the U+FFFD is a real invalid sequence and is let through.
_MAX_HELD_TOKENS = 8


class Tokenizer:
    """Encode prompts and decode generated ids exactly as the model's HF tokenizer does."""

    def __init__(self, backend, *, bos_token_id: int | None = None, eos_token_ids: Iterable[int] = (),
                 add_bos: bool = False):
        if add_bos and bos_token_id is None:
            raise ArxError("the manifest says to add BOS but gives no bos_token_id; re-export the bundle")
        self.backend = backend  # tokenizers.Tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos
        self._special_ids: frozenset[int] | None = None

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.is_file():
            raise ArxError(f"{path} does not exist; re-export the bundle, or generate with --prompt-ids")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise ArxError(f"{path} is not a valid tokenizer.json ({str(e)[:200]}); re-export the bundle") from e
        return cls(backend, **kwargs)

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, info) -> "Tokenizer":
        """From a bundle and its manifest's `TokenizerInfo` (arx.manifest)."""
        if not info.file:
            raise ArxError(f"the bundle {bundle_dir} has no tokenizer (its source shipped none); "
                           f"pass token ids with --prompt-ids")
        return cls.from_file(Path(bundle_dir) / info.file, bos_token_id=info.bos_token_id,
                             eos_token_ids=info.eos_token_ids, add_bos=info.add_bos)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) drops."""
        if self._special_ids is None:
            added = self.backend.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        return self._special_ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS in front exactly when HF adds it (the manifest's add_bos).

        The post-processor of tokenizer.json is bypassed: BOS is the one special token a causal
        LM prompt gets, and the manifest flag (measured at export) is the single source of truth.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos else list(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_token_id, *e.ids] if self.add_bos else list(e.ids) for e in encs]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turn ids arriving one at a time into printable text pieces.

    Contract: "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids).

    Decoding single tokens does not work: a character can span several byte-level tokens, and
    decoders drop or add spaces depending on a token's neighbours (Metaspace "▁", Strip). So each
    step decodes a small window `ids[prefix:]` and emits what it adds to `ids[prefix:read]`, the
    window without the new tokens (the text-generation-inference technique). Decoding both from
    the same start makes start-of-window effects cancel out; text ending in U+FFFD is held back
    until the character is complete. Work per step is O(window), not O(sequence).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: the tokens before it are fully emitted and never re-read
        self._read = 0  # ids[:read] are emitted

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became printable (often "", never a partial char)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (e.g. a truncated character)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tok.backend.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        after = decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        held = len(self._ids) - self._read
        if not final and after.endswith(_REPLACEMENT) and held < _MAX_HELD_TOKENS:
            return ""
        if not after.startswith(before):
            # A decoder rewrote the shared prefix (rare: cleanup rules). Fall back to the
            # whole-sequence difference so the output stays exact.
            before = decode(self._ids[:self._read], skip_special_tokens=self._skip)
            after = decode(self._ids, skip_special_tokens=self._skip)
        piece = after[len(before):]
        self._prefix, self._read = self._anchor(), len(self._ids)
        return piece

    def _anchor(self) -> int:
        """Where the next window starts: the last emitted token that decodes to visible text.

        Decoders treat the first token of a decode call specially (Metaspace and Strip drop its
        leading space); a skipped special token there would hand that role to the next token
        and lose its space, so the window starts at an ordinary token before it.
        """
        hidden = self._tok.special_ids if self._skip else frozenset()
        for i in range(self._read - 1, self._prefix - 1, -1):
            if self._ids[i] not in hidden:
                return i
        return self._prefix
