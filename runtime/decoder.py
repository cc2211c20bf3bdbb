"""A bundle's decoder stage, stepped with its KV cache. All feeds derive from the manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest, read_manifest
from arx.runtime.backend import BackendOptions, OrtBackend
from arx.runtime.generate import Capacity
from arx.runtime.int8_kernel import warn_if_saturating
from arx.runtime.kv_cache import KVCache

LOGITS_MODES = ("all", "last", "none")
MASKS = ("causal", "block")
TOKEN_INPUTS = ("input_ids", "inputs_embeds")
# The general-step graph (export/step_graph.py): per-row lengths in place of attention_mask.
LENGTH_INPUTS = ("past_lengths", "new_lengths", "block_mask")  # (B,) int64 each
STEP_GRAPH = "step_graph"  # manifest section: its stage, and the decoder whose weights it uses


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
        self.options = options
        _check_dtype_runs(self.manifest, options)
        self.backend = OrtBackend(path, aliases=aliases, options=options)
        warn_if_saturating(self.manifest, self.backend.device)  # the device it resolved to
        self._general = None  # (backend, input names) of the general-step graph, once needed
        self._embedder = None  # the pipeline's embed stage, once needed
        # Called with each step's feeds (cache buffers included, valid only during the call)
        # before the step runs: arx calibrate reads a next-scale bundle's activations this way.
        self.observer = None

    def __enter__(self) -> "DecoderSession":
        return self

    def __exit__(self, *exc) -> None:
        self.backend.close()
        if self._general is not None:
            self._general[0].close()
        if self._embedder is not None:
            self._embedder.close()

    @property
    def in_place(self) -> bool:
        return self.kv.update == "in_place"

    @property
    def ragged(self) -> bool:
        """Rows of a batch may hold different lengths (only the in-place cache tracks them)."""
        return self.in_place

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.kv.max_seq_len, "the bundle's context",
                        "re-export with a larger --max-seq-len")

    @property
    def general_steps(self) -> bool:
        """Whether steps beyond decode and prefill (multi-token after a past at batch > 1,
        rows with no new token, the block mask) can run: the bundle has the general graph."""
        return self.in_place and STEP_GRAPH in self.manifest.extensions

    def new_cache(self, batch: int, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.backend, self.kv, batch, max_seq_len)

    def step(self, cache: KVCache, input_ids: np.ndarray | None, new_lens: np.ndarray, *,
             logits: str | np.ndarray = "all", mask: str = "causal",
             inputs_embeds: np.ndarray | None = None) -> np.ndarray | None:
        """Run a block of new tokens per row after each row's past; store their keys/values.

        input_ids (B, S) int64, right-padded (or inputs_embeds (B, S, H) where the stage takes
        embeddings); new_lens (B,) valid tokens per row, 0..S, rows of any past length.
        mask "causal": token t sees the past and new tokens <= t; "block": every valid new
        token of its row as well (bidirectional in the block, full over the past).
        logits "all" -> (B, S, V) (positions past new_lens[b] are padding, meaningless);
        "last" -> (B, 1, V) at each row's last new token; an int64 array (B, K) of positions
        within the step -> (B, K, V); "none" -> None.
        Width-1 decode and a prefill with no past run the fused GroupQueryAttention graph;
        other steps the bundle's general-step graph (docs/design.md, "Attention").
        """
        tokens = _tokens(input_ids, inputs_embeds)
        if tokens[0] == "input_ids" and "input_ids" not in self.input_names \
                and self.manifest.pipeline.embed:
            tokens = ("inputs_embeds", self.embed(tokens[1]))
        b, s = tokens[1].shape[:2]
        new_lens = _check_new_lens(new_lens, b, s)
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, not {mask!r}")
        picks = _logit_positions(logits, new_lens, s)  # (B, K) or None
        _check_room(cache, new_lens)
        backend, names = self._graph_for(cache, new_lens, s, mask)
        if tokens[0] not in names:
            raise ArxError(f"this bundle's decoder takes {sorted(names & set(TOKEN_INPUTS))[0]}, "
                           f"not {tokens[0]}")
        feeds = self._feeds(cache, tokens, new_lens, mask, picks, names)
        if self.observer is not None:
            self.observer(feeds)
        outputs = backend.run(feeds)
        cache.advance(new_lens, outputs)
        out = outputs["logits"]
        if picks is not None and "logits_indices" not in names:  # e.g. protocol graphs
            out = np.take_along_axis(out, picks[:, :, None], axis=1)
        return None if picks is None else out

    def drop_fused(self) -> None:
        """Close the fused graph's session (no step may use it after): parity at export runs
        its last, general step with only the general-step graph's weights resident."""
        self.backend.close()

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, S) ids -> (B, S, hidden) embeddings through the pipeline's embed stage, for a
        decoder that takes inputs_embeds (opened on first use)."""
        if self._embedder is None:
            self._embedder = EmbedStage(self.bundle_dir, self.manifest, self.options)
        return self._embedder(input_ids)

    def _feeds(self, cache: KVCache, tokens, new_lens, mask, picks, names) -> dict:
        b, s = tokens[1].shape[:2]
        feeds = {tokens[0]: np.ascontiguousarray(tokens[1])}
        totals = cache.lengths + new_lens
        if "attention_mask" in names:
            # (B, total): ones over each sequence's tokens, past + new, left-aligned
            feeds["attention_mask"] = (np.arange(int(totals.max()))[None, :]
                                       < totals[:, None]).astype(np.int64)
        if "position_ids" in names:
            pos = cache.lengths[:, None] + np.arange(s)[None, :]
            feeds["position_ids"] = np.minimum(pos, cache.max_seq_len - 1).astype(np.int64)
        if LENGTH_INPUTS[0] in names:  # the general-step graph
            block = np.full(b, int(mask == "block"), np.int64)
            feeds.update(zip(LENGTH_INPUTS, (cache.lengths.copy(), new_lens, block)))
        if "logits_indices" in names:  # "none": zero rows reach the LM head
            feeds["logits_indices"] = picks if picks is not None else np.zeros((b, 0), np.int64)
        feeds.update(cache.feeds())
        return feeds

    def _graph_for(self, cache: KVCache, new_lens: np.ndarray, s: int, mask: str):
        """(backend, its input names): the fused graph where GroupQueryAttention is right for
        the step, else the general-step graph (opened on first use)."""
        if not self.in_place:  # concat graphs: causal, and after a past one length for all rows
            fresh = not cache.lengths.any()  # a right-padded causal prefill is right as it is
            if mask == "block" and s > 1 or not fresh and (
                    (new_lens != s).any() or len(set(cache.lengths.tolist())) > 1):
                raise ArxError("this bundle's cache grows by concatenation (a custom-protocol "
                               "export): its steps need one length for every row and the causal "
                               "mask; run rows one at a time")
            return self.backend, self.input_names
        if _fused_ok(cache.lengths, new_lens, s, mask):
            return self.backend, self.input_names
        over = np.flatnonzero(cache.lengths + s > cache.max_seq_len)
        if over.size:  # TensorScatter writes the whole block, padding included
            i = int(over[0])
            raise ArxError(f"a step {s} tokens wide writes {s} cache entries per row, padding "
                           f"included, but row {i} already holds {int(cache.lengths[i])} of the "
                           f"cache's {cache.max_seq_len}: make the cache longer by the widest "
                           f"step (new_cache(batch, max_seq_len)) or narrow the step")
        if self._general is None:
            self._general = self._open_general()
        return self._general

    def _open_general(self):
        stage_name = self.manifest.extensions.get(STEP_GRAPH, {}).get("stage")
        stage = self.manifest.stages.get(stage_name) if stage_name else None
        if stage is None:
            raise ArxError(f"bundle {self.bundle_dir} has no general-step graph, which a "
                           f"multi-token step after a past at batch > 1, a row with no new "
                           f"tokens or the block mask needs; re-export it with this arx")
        info, path = self.manifest.extensions[STEP_GRAPH], self.bundle_dir / stage.file
        decoder = self.bundle_dir / info["weights_of"]
        if not path.is_file() or not decoder.is_file() or \
                hashlib.sha256(decoder.read_bytes()).hexdigest() != info["sha256"]:
            raise ArxError(f"{path.name} of bundle {self.bundle_dir} is missing or belongs to "
                           f"other weights than {decoder.name} (a calibrated copy?); steps other "
                           f"than decode and prefill need a bundle re-exported with this arx")
        backend = OrtBackend(path, aliases=self.backend.aliases, options=self.options)
        return backend, {t.name for t in stage.inputs}


def _check_dtype_runs(manifest: Manifest, options: BackendOptions) -> None:
    """bf16 bundles (arx export --dtype bf16) are for CUDA and TensorRT: ORT's CPU provider has
    no bfloat16 MatMul, so say so before a session fails to load with a kernel error."""
    if manifest.model.get("dtype") != "bfloat16":
        return
    from arx.runtime.backend import resolve_device

    if resolve_device(options.device) == "cpu":
        raise ArxError("this bundle is bfloat16 (arx export --dtype bf16), which onnxruntime's "
                       "CPU provider cannot run (no bfloat16 MatMul): run it with --device cuda "
                       "or as a TensorRT engine (arx build), or re-export with --dtype fp16 or "
                       "fp32 for the CPU")


def _fused_ok(past: np.ndarray, new_lens: np.ndarray, s: int, mask: str) -> bool:
    """Where GroupQueryAttention (ORT 1.31 CPU) is right: width-1 decode of every row, a causal
    prefill with no past (right-padded, the widest row fills the step), and a full-width
    causal step at batch 1. It refuses multi-token steps with a past at batch > 1 and would
    write a row with no new token over that row's last one."""
    if s == 1:
        return bool((new_lens == 1).all())
    if mask != "causal":
        return False
    if not past.any():
        return bool((new_lens >= 1).all() and new_lens.max() == s)
    return len(new_lens) == 1 and int(new_lens[0]) == s


class EmbedStage:
    """The pipeline's embed stage on its own: (B, S) ids -> (B, S, hidden) embeddings (what
    DecoderSession.embed runs; calibration's probes use it without opening the decoder)."""

    def __init__(self, bundle_dir: Path, manifest, options: BackendOptions = BackendOptions()):
        name = manifest.pipeline.embed
        if name is None:
            raise ArxError("this bundle has no embedder stage; give input_ids to its decoder")
        stage = manifest.stages[name]
        path = Path(bundle_dir) / stage.file
        if not path.is_file():
            raise ArxError(f"bundle {bundle_dir} lacks {stage.file}; re-export it")
        self.backend = OrtBackend(path, options=options)

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        return self.backend.run({"input_ids": ids})["inputs_embeds"]

    def close(self) -> None:
        self.backend.close()


def _tokens(input_ids, inputs_embeds) -> tuple[str, np.ndarray]:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        return "input_ids", np.asarray(input_ids, dtype=np.int64)
    return "inputs_embeds", np.asarray(inputs_embeds, dtype=np.float32)


def _check_new_lens(new_lens, b: int, s: int) -> np.ndarray:
    new_lens = np.ascontiguousarray(new_lens, dtype=np.int64)
    if new_lens.shape != (b,) or b and (new_lens.min() < 0 or new_lens.max() > s):
        raise ArxError(f"new_lens must be {b} counts of new tokens in 0..{s} (one per row), "
                       f"got {new_lens.tolist()}")
    return new_lens


def _logit_positions(logits, new_lens: np.ndarray, s: int) -> np.ndarray | None:
    """(B, K) int64 positions within the step whose logits are computed; None for "none"."""
    b = len(new_lens)
    if isinstance(logits, str):
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {LOGITS_MODES} or positions, not {logits!r}")
        if logits == "none":
            return None
        if logits == "last":  # a row with no new token: position 0, meaningless
            return np.maximum(new_lens - 1, 0)[:, None]
        return np.tile(np.arange(s, dtype=np.int64), (b, 1))
    picks = np.asarray(logits)
    if picks.ndim != 2 or picks.shape[0] != b or picks.dtype.kind not in "iu" or \
            (picks < 0).any() or (picks >= s).any():
        raise ArxError(f"logits positions must be a ({b}, K) integer array of positions in "
                       f"0..{s - 1} within the step, got shape {picks.shape}")
    return picks.astype(np.int64)


def _check_room(cache: KVCache, new_lens: np.ndarray) -> None:
    totals = cache.lengths + new_lens
    if totals.max() > cache.max_seq_len:
        raise ArxError(f"sequence of {int(totals.max())} tokens exceeds the cache of "
                       f"{cache.max_seq_len}; lower --max-new-tokens or re-export with a "
                       f"larger --max-seq-len")
