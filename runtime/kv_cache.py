"""The KV cache as explicit state of the decoder graph.

in_place (the fast path): one preallocated buffer per layer for keys and one for values,
    # (B, kv_heads, S_max, D)
bound as both `past_key_values.{i}.*` and `present.{i}.*`; the attention op writes each
step's new keys/values at every sequence's own length. Nothing grows, nothing is copied.

concat (custom protocol modules): the graph returns present = concat(past, new); the cache
keeps those arrays and feeds them back next step: the slow baseline.

`lengths` (B,) is the only state besides the buffers: `rollback(lengths)` cuts rows back
(rejected draft tokens, a cancelled request) at no cost, since every attention op reads only
each row's first `lengths` entries and the next step overwrites the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arx.errors import ArxError
from arx.manifest import KVLayout


class KVCache:
    def __init__(self, backend, layout: KVLayout, batch: int, max_seq_len: int | None = None):
        self.layout = layout
        self.batch = batch
        self.max_seq_len = max_seq_len or layout.max_seq_len
        self.lengths = np.zeros(batch, dtype=np.int64)  # tokens stored per sequence
        self.in_place = layout.update == "in_place"
        shape_len = self.max_seq_len if self.in_place else 0
        shape = (batch, layout.kv_heads, shape_len, layout.head_dim)  # (B, kv_heads, S, D)
        self.backend = backend
        self.buffers: dict[str, Any] = {}
        for past, _ in layout.pairs():
            self.buffers[past] = (backend.allocate(shape, layout.dtype) if self.in_place
                                  else np.zeros(shape, dtype=layout.dtype))
        self._rows: dict[tuple[int, int], RowCache | None] = {}

    def aliases(self) -> dict[str, str]:
        """present output -> past input, for backends that write in place."""
        return {present: past for past, present in self.layout.pairs()} if self.in_place else {}

    def feeds(self) -> dict[str, Any]:
        return dict(self.buffers)

    def advance(self, new_tokens: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Account for `new_tokens` (B,) stored per sequence; adopt concat-mode presents."""
        self.lengths += new_tokens
        if not self.in_place:
            for past, present in self.layout.pairs():
                self.buffers[past] = outputs.pop(present)

    def close(self) -> None:
        """Drop the buffers (ORT frees an OrtValue when its last reference goes)."""
        if self.in_place:
            for buf in self.buffers.values():
                self.backend.release(buf)
        self.buffers, self._rows = {}, {}

    def row(self, b: int) -> "RowCache | None":
        """Row b as a batch-1 cache over the same memory (its writes land in this cache), or
        None where the backend has no such view: a serving loop prefills one request at batch
        1 on the fused graph while the others' rows stay as they are."""
        return self.rows(b, b + 1)

    def rows(self, start: int, stop: int) -> "RowCache | None":
        """Rows start:stop as a cache of their own over the same memory (a decode step over
        just the occupied rows), or None where the backend has no host view (a device)."""
        key = (start, stop)
        if key not in self._rows:
            views = {k: self.backend.rows(v, start, stop) for k, v in self.buffers.items()} \
                if self.in_place and hasattr(self.backend, "rows") else {}
            ok = views and all(v is not None for v in views.values())
            self._rows[key] = RowCache(self, start, stop, views) if ok else None
        return self._rows[key]

    def rollback(self, lengths: np.ndarray) -> None:
        """Cut each row back to `lengths` (B,) tokens (rejected draft tokens, a cancelled
        request): nothing is cleared, the next step overwrites those positions, and every
        attention op reads only each row's first `lengths` entries."""
        lengths = np.asarray(lengths)
        if lengths.shape != self.lengths.shape or lengths.dtype.kind not in "iu" or \
                (lengths < 0).any() or (lengths > self.lengths).any():
            raise ArxError(f"rollback takes one length per row, each between 0 and the row's "
                           f"current length {self.lengths.tolist()} (it never grows a row); "
                           f"got {lengths.tolist()}")
        if not self.in_place:
            if len(set(lengths.tolist())) > 1:
                raise ArxError("this bundle's cache grows by concatenation (a custom-protocol "
                               "export), so its rows share one length: roll them back to one "
                               "length, or use a bundle with the in-place cache")
            keep = int(lengths[0]) if len(lengths) else 0  # (B, kv_heads, keep, D)
            self.buffers = {k: v[:, :, :keep] for k, v in self.buffers.items()}
        self.lengths = lengths.astype(np.int64)


class RowCache:
    """Rows start:stop of a KVCache seen as a cache of their own: the same buffers' memory, the
    parent's lengths (read and advanced through the parent)."""

    def __init__(self, parent: KVCache, start: int, stop: int, buffers: dict[str, Any]):
        self.parent, self.start, self.stop, self.buffers = parent, start, stop, buffers
        self.layout, self.max_seq_len, self.in_place = parent.layout, parent.max_seq_len, True

    @property
    def lengths(self) -> np.ndarray:
        return self.parent.lengths[self.start:self.stop].copy()

    def feeds(self) -> dict[str, Any]:
        return dict(self.buffers)

    def advance(self, new_tokens: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        self.parent.lengths[self.start:self.stop] += np.asarray(new_tokens, np.int64)
