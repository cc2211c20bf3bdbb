"""A TensorRT engine behind the step API of `runtime/generate.py` (the TensorRT form's IO; numpy).

    cache     one device buffer per past_key_values.i.* (B, kv_heads, S_max, D), allocated per
              generation and released at its end; the engine writes it in place (present.i.* is
              bound to the same address); per-row lengths live on the host and roll back freely
    step      input_ids (B, S) right-padded, past_lengths (B,) and new_lengths (B,): each row's
              tokens before the step and valid tokens in it, so ragged steps with a past are
              exact; decode steps have fixed shapes and addresses, and the backend replays one
              CUDA graph per token
    tokens    engine with arx::sample: sampling_params (B,5), presence (B,V), seed, offset (the
              position of the drawn token), row (the Philox row term: arange(B) as the host
              Sampler's; the image loop sets zeros) in, token_ids out; engine with ArgMax:
              token_ids (greedy); otherwise `last_logits`, which the loop samples on the host
              with the same arx::sample definition and offsets, so the same seed gives the
              same tokens

The IO, S_max and the max batch come from the manifest's `builds[target]` entry that
`arx build` wrote. `backend` is anything with allocate(shape, dtype), release(buffer) and
run(feeds) -> {name: array} that honours the present -> past aliases: the TensorRT backend on a
device, or (in the tests) ONNX Runtime running the same TensorRT-form graph.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest, read_manifest
from arx.runtime.generate import Capacity
from arx.runtime.sampler import SamplingOptions

# An image engine's sampler row dim: one row per [cond; null] pair (builder/image_form.py)
IMAGE_ROWS = "images"

TOKEN_IDS, LAST_LOGITS, LOGITS = "token_ids", "last_logits", "logits"
VERIFY_IDS = "verify_ids"  # arx build --logits verify: (B, S) each position's greedy token


class EngineCache:
    """The static device cache of one generation and each row's length (host side)."""

    def __init__(self, backend, buffers: dict[str, Any], batch: int):
        self.backend, self.buffers = backend, buffers
        self.lengths = np.zeros(batch, np.int64)
        self.sampler_feeds: dict[str, Any] = {}  # arx::sample inputs, when the engine samples

    def rollback(self, lengths: np.ndarray) -> None:
        """Forget each row's tokens past lengths[b]; later steps overwrite those slots."""
        lengths = np.asarray(lengths, np.int64)
        if lengths.shape != self.lengths.shape or (lengths > self.lengths).any() or (lengths < 0).any():
            raise ArxError("rollback can only shorten rows (0 <= length <= current length)")
        self.lengths = lengths.copy()

    def close(self) -> None:
        owned = [*self.buffers.values(), *(v for v in self.sampler_feeds.values()
                                           if not isinstance(v, np.ndarray))]
        for buf in owned:
            self.backend.release(buf)
        self.buffers, self.sampler_feeds = {}, {}


class EngineSession:
    """An engine's IO (from the manifest's build entry) and its backend."""

    ragged = True  # per-row lengths are inputs of every step

    def __init__(self, backend, build: Mapping[str, Any], manifest: Manifest):
        self.backend, self.manifest = backend, manifest
        self.inputs = {t["name"]: t for t in build["io"]["inputs"]}
        self.outputs = {t["name"] for t in build["io"]["outputs"]}
        self.s_max = int(build["max_seq_len"])
        self.max_batch = int(build["max_batch"])

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.s_max, "the engine's static cache",
                        "rebuild with a larger arx build --max-seq-len", self.max_batch,
                        "rebuild with a larger arx build --max-batch")

    def new_cache(self, batch: int, max_len: int | None = None) -> EngineCache:
        kv = self.manifest.kv
        buffers = {past: self.backend.allocate((batch, kv.kv_heads, self.s_max, kv.head_dim),
                                               self.inputs[past]["dtype"])
                   for past, _ in kv.pairs()}
        return EngineCache(self.backend, buffers, batch)

    def device_sampling(self, cache: EngineCache, sampling: SamplingOptions,
                        seen: np.ndarray | None) -> bool:
        """Whether this engine picks the tokens itself for `sampling`; sets up its inputs."""
        batch = self.sampler_rows(cache)
        if "sampling_params" in self.inputs:
            # without a repetition penalty presence is a zeroed device buffer bound as is, so
            # no (B, V) host array goes to the device every token
            presence = seen if seen is not None else self.backend.allocate(
                (batch, self.inputs["presence"]["shape"][1]), "bool")
            cache.sampler_feeds = {"sampling_params": np.tile(sampling.params().row(), (batch, 1)),
                                   "presence": presence,
                                   "seed": np.full(batch, sampling.seed, np.int64),
                                   "row": np.arange(batch, dtype=np.int64)}  # as Sampler's
            return True
        greedy = not sampling.do_sample and sampling.repetition_penalty == 1.0
        if greedy and TOKEN_IDS in self.outputs:
            return True  # the ArgMax form
        if LAST_LOGITS not in self.outputs:
            raise ArxError("this engine returns greedy token ids only (--sampler argmax --logits "
                           "none); use --greedy, or rebuild with --sampler plugin or --logits last")
        return False

    def sampler_rows(self, cache: EngineCache) -> int:
        """Rows arx::sample draws: one per cache row, or per [cond; null] pair in an image
        engine, whose sampler mixes the two halves (builder/image_form.py)."""
        batch = cache.lengths.shape[0]
        seed = self.inputs.get("seed")
        return batch // 2 if seed is not None and seed["shape"][0] == IMAGE_ROWS else batch

    def step(self, cache: EngineCache, ids: np.ndarray | None, new_lens: np.ndarray,
             logits: str = "last", inputs_embeds: np.ndarray | None = None) -> np.ndarray:
        """Logits (B, 1, V) of each row's last new token; "all": (B, S, V) at every position
        of the step (a speculative verify step), from an engine built with --logits all."""
        if logits == "all" and LOGITS in self.outputs:
            return np.asarray(self._run(cache, ids, new_lens, inputs_embeds)[LOGITS])
        if logits not in ("last", "all") or LAST_LOGITS not in self.outputs:
            raise ArxError("this engine returns only each row's last logits (arx build "
                           "--logits last); ask for logits='last' or rebuild")
        if logits == "all":
            raise ArxError("this engine returns only each row's last logits; verifying "
                           "speculated tokens needs every position: rebuild it with arx build "
                           "--logits all")
        return np.asarray(self._run(cache, ids, new_lens, inputs_embeds)[LAST_LOGITS])[:, None]

    def step_verify(self, cache: EngineCache, ids: np.ndarray, new_lens: np.ndarray) -> np.ndarray:
        """(B, S) each position's greedy token, chosen on the device (an engine built with
        --logits verify): a greedy verify step with no logits leaving the device."""
        if VERIFY_IDS not in self.outputs:
            raise ArxError("this engine does not return every position's greedy token; rebuild "
                           "it with arx build --logits verify")
        return np.asarray(self._run(cache, ids, new_lens)[VERIFY_IDS], np.int64)

    def step_tokens(self, cache: EngineCache, ids: np.ndarray | None, new_lens: np.ndarray,
                    inputs_embeds: np.ndarray | None = None) -> np.ndarray:
        """(B,) the token the engine chose after each row's new tokens (an image engine: (I,)
        codebook ids, one per image)."""
        return np.asarray(self._run(cache, ids, new_lens, inputs_embeds)[TOKEN_IDS], np.int64)

    def _run(self, cache: EngineCache, ids: np.ndarray | None, new_lens: np.ndarray,
             inputs_embeds: np.ndarray | None = None) -> dict:
        new_lens = np.asarray(new_lens, np.int64)
        totals = cache.lengths + new_lens
        if totals.max() > self.s_max:
            raise ArxError(f"sequence of {int(totals.max())} tokens exceeds the engine's static "
                           f"cache of {self.s_max}; rebuild with a larger arx build --max-seq-len")
        tokens = ("input_ids", np.ascontiguousarray(ids, dtype=np.int64)) if inputs_embeds is None \
            else ("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        feeds: dict[str, Any] = {tokens[0]: tokens[1],
                                 "past_lengths": cache.lengths.copy(), "new_lengths": new_lens,
                                 **cache.buffers, **cache.sampler_feeds}
        if "offset" in self.inputs:  # Philox counter = position of the drawn token (an image
            feeds["offset"] = totals[:self.sampler_rows(cache)]  # engine: of its cond row)
        if "position_ids" in self.inputs:
            pos = cache.lengths[:, None] + np.arange(tokens[1].shape[1])[None]
            feeds["position_ids"] = np.minimum(pos, self.s_max - 1).astype(np.int64)
        out = self.backend.run({k: v for k, v in feeds.items() if k in self.inputs})
        cache.lengths = totals
        return out


def engine_build(manifest: Manifest, bundle: str | Path, target: str) -> Mapping[str, Any]:
    """The manifest's record of the engine `arx build BUNDLE --target TARGET` made."""
    entry = manifest.builds.get(target)
    if not entry or entry.get("kind") != "engine":
        raise ArxError(f"bundle {bundle} has no engine for {target}; build one with: "
                       f"arx build {bundle} --target {target}")
    if "io" not in entry:
        raise ArxError(f"the {target} engine of {bundle} was built by an older arx; rebuild it "
                       f"with: arx build {bundle} --target {target}")
    return entry


@contextmanager
def open_engine(bundle: str | Path, target: str) -> Iterator[EngineSession]:
    """The engine `arx build BUNDLE --target TARGET` made, loaded on this GPU (needs TensorRT)."""
    from arx.runtime.tensorrt_backend import TensorRTBackend, load_build_report

    manifest = read_manifest(bundle)
    build = engine_build(manifest, bundle, target)
    engine, report = load_build_report(bundle, build)
    with TensorRTBackend(engine, report) as backend:
        yield EngineSession(backend, build, manifest)
