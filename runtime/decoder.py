"""A bundle's decoder stage, stepped with its KV cache. All feeds derive from the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest, read_manifest
from arx.runtime.backend import BackendOptions, OrtBackend
from arx.runtime.kv_cache import KVCache


class DecoderSession:
    def __init__(self, bundle_dir: str | Path, options: BackendOptions = BackendOptions(),
                 manifest: Manifest | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or read_manifest(self.bundle_dir)
        stage = self.manifest.decoder
        self.kv = self.manifest.kv
        self.input_names = {t.name for t in stage.inputs}
        aliases = ({present: past for past, present in self.kv.pairs()}
                   if self.kv.update == "in_place" else {})
        path = self.bundle_dir / stage.file
        if not path.is_file():
            raise ArxError(f"bundle {self.bundle_dir} lacks {stage.file}; re-export it")
        self.backend = OrtBackend(path, aliases=aliases, options=options)

    def __enter__(self) -> "DecoderSession":
        return self

    def __exit__(self, *exc) -> None:
        self.backend.close()

    @property
    def in_place(self) -> bool:
        return self.kv.update == "in_place"

    def new_cache(self, batch: int, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.backend, self.kv, batch, max_seq_len)

    def step(self, cache: KVCache, input_ids: np.ndarray, new_lens: np.ndarray,
             logits: str = "all") -> np.ndarray:
        """Run new tokens through the decoder and store their keys/values.

        input_ids (B, S) int64, right-padded; new_lens (B,) valid tokens per row.
        logits "all": returns (B, S, V), rows past new_lens[b] are padding and meaningless;
        "last": returns (B, 1, V), each sequence's last new token only (what generation needs).
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', not {logits!r}")
        b, s = input_ids.shape
        totals = cache.lengths + new_lens
        if totals.max() > cache.max_seq_len:
            raise ArxError(f"sequence of {int(totals.max())} tokens exceeds the cache of "
                           f"{cache.max_seq_len}; lower --max-new-tokens or re-export with a "
                           f"larger --max-seq-len")
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
        if "attention_mask" in self.input_names:
            # (B, total): ones over each sequence's tokens, past + new, left-aligned
            total = int(totals.max())
            feeds["attention_mask"] = (np.arange(total)[None, :] < totals[:, None]).astype(np.int64)
        if "position_ids" in self.input_names:
            pos = cache.lengths[:, None] + np.arange(s)[None, :]
            feeds["position_ids"] = np.minimum(pos, cache.max_seq_len - 1).astype(np.int64)
        last = (new_lens.astype(np.int64) - 1)[:, None]  # (B, 1)
        if "logits_indices" in self.input_names:
            feeds["logits_indices"] = last if logits == "last" else np.tile(np.arange(s), (b, 1))
        feeds.update(cache.feeds())
        outputs = self.backend.run(feeds)
        cache.advance(new_lens.astype(np.int64), outputs)
        out = outputs["logits"]
        if logits == "last" and "logits_indices" not in self.input_names:  # e.g. protocol graphs
            out = np.take_along_axis(out, last[:, :, None], axis=1)
        return out
