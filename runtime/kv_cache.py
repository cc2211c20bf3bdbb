"""The KV cache as explicit state of the decoder graph.

in_place (the fast path): one preallocated buffer per layer for keys and one for values,
    # (B, kv_heads, S_max, D)
bound as both `past_key_values.{i}.*` and `present.{i}.*`; the attention op writes each
step's new keys/values at every sequence's own length. Nothing grows, nothing is copied.

concat (custom protocol modules): the graph returns present = concat(past, new); the cache
keeps those arrays and feeds them back next step: the slow baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
        self.buffers: dict[str, Any] = {}
        for past, _ in layout.pairs():
            self.buffers[past] = (backend.allocate(shape, layout.dtype) if self.in_place
                                  else np.zeros(shape, dtype=layout.dtype))

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

    def remaining(self) -> int:
        return int(self.max_seq_len - self.lengths.max())
