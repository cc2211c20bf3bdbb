"""The autoregressive loop on a TensorRT engine (the TensorRT form's IO; numpy only).

    cache     one device buffer per past_key_values.i.* (B, kv_heads, S_max, D), allocated once;
              the engine writes it in place (present.i.* is bound to the same address)
    prefill   input_ids (B, P) right-padded, attention_mask (B, P): row sums = prompt lengths
    decode    input_ids (B, 1), attention_mask (B, S_max) of fixed width (only row sums matter),
              so every step has the same shapes and addresses and the backend replays one
              CUDA graph per token
    tokens    engine with arx::sample: sampling_params (B,5), presence (B,V), seed, offset (+1
              every step) in, token_ids out; engine with ArgMax: token_ids (greedy); an engine
              returning only last_logits, or sampling asked of an ArgMax engine: the host
              Sampler on last_logits (Hugging Face's processors, as `arx generate` on ORT)

`backend` is anything with allocate(shape, dtype) and run(feeds) -> {name: array} that honours
the present -> past aliases: runtime.tensorrt_backend.TensorRTBackend on a device, or (in the
tests) ONNX Runtime running the same TensorRT-form graph.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest, read_manifest
from arx.plugins.sampling.reference import SamplingParams
from arx.runtime.generate import (GenerateOptions, GenerationResult, TokenCallback, check_prompts,
                                  record_tokens, seen_tokens)
from arx.runtime.sampler import Sampler, SamplingOptions

TOKEN_IDS, LAST_LOGITS = "token_ids", "last_logits"


class EngineSession:
    """An engine's IO (from its build report) and its backend, stepped with a static cache."""

    def __init__(self, backend, report: Mapping[str, Any], manifest: Manifest):
        self.backend, self.manifest = backend, manifest
        self.inputs = {t["name"]: t for t in report["io"]["inputs"]}
        self.outputs = {t["name"] for t in report["io"]["outputs"]}
        self.s_max = int(report["max_seq_len"])
        self.max_batch = int(report["max_batch"])
        self.device_sampler = "sampling_params" in self.inputs

    def new_cache(self, batch: int) -> dict[str, Any]:
        kv = self.manifest.kv
        return {past: self.backend.allocate((batch, kv.kv_heads, self.s_max, kv.head_dim),
                                            self.inputs[past]["dtype"])
                for past, _ in kv.pairs()}

    def step(self, cache: Mapping[str, Any], ids: np.ndarray, lengths: np.ndarray,
             totals: np.ndarray, width: int, sampler_feeds: Mapping[str, np.ndarray]) -> dict:
        """Run ids (B, S) whose rows end at totals[b] tokens; lengths = tokens before them."""
        feeds: dict[str, Any] = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                                 "attention_mask": (np.arange(width)[None] < totals[:, None])
                                 .astype(np.int64), **cache, **sampler_feeds}
        if "position_ids" in self.inputs:
            pos = lengths[:, None] + np.arange(ids.shape[1])[None]
            feeds["position_ids"] = np.minimum(pos, self.s_max - 1).astype(np.int64)
        return self.backend.run({k: v for k, v in feeds.items() if k in self.inputs})


@contextmanager
def open_engine(bundle: str | Path, target: str) -> Iterator[EngineSession]:
    """The engine `arx build BUNDLE --target TARGET` made, loaded on this GPU (needs TensorRT)."""
    from arx.runtime.tensorrt_backend import TensorRTBackend, load_build_report

    engine, report = load_build_report(bundle, target)
    with TensorRTBackend(engine, report) as backend:
        yield EngineSession(backend, report, read_manifest(bundle))


def engine_sampler_feeds(sampling: SamplingOptions, batch: int, seed: int,
                         presence: Any) -> dict[str, Any]:
    """The arx::sample inputs at step 0 (temperature 0 = greedy, as in the plugin's spec); a
    later step only sets "offset" to its index."""
    row = SamplingParams(temperature=sampling.temperature if sampling.do_sample else 0.0,
                         top_k=sampling.top_k, top_p=sampling.top_p,
                         repetition_penalty=sampling.repetition_penalty)
    return {"sampling_params": np.tile(row.row(), (batch, 1)), "presence": presence,
            "seed": np.full(batch, seed, np.int64), "offset": np.zeros(batch, np.int64)}


def generate_on_engine(session: EngineSession, prompts: list[list[int]], options: GenerateOptions,
                       on_token: TokenCallback | None = None) -> GenerationResult:
    m, o = session.manifest, options.sampling
    options = check_prompts(m, session.s_max, prompts, options, "the engine's static cache",
                            "rebuild with a larger arx build --max-seq-len")
    batch = len(prompts)
    if batch > session.max_batch:
        raise ArxError(f"{batch} prompts exceed the engine's max batch of {session.max_batch}; "
                       f"rebuild with arx build --max-batch {batch}")
    on_device = session.device_sampler
    host_needed = not on_device and (o.do_sample or o.repetition_penalty != 1.0
                                     or TOKEN_IDS not in session.outputs)
    if host_needed and LAST_LOGITS not in session.outputs:
        raise ArxError("this engine returns greedy token ids only (--sampler argmax --logits "
                       "none); use --greedy, or rebuild with --sampler plugin or --logits last")
    host = Sampler(o, m.vocab_size) if host_needed else None
    seed = o.seed if o.seed is not None else int(np.random.SeedSequence().entropy % (1 << 62))
    lengths = np.array([len(p) for p in prompts], np.int64)
    seen = seen_tokens(prompts, m.vocab_size) if o.repetition_penalty != 1.0 else None
    feeds: dict[str, Any] = {}
    if on_device:  # built once; without a repetition penalty, presence is a zeroed device
        # buffer bound as is, so no (B, V) host array is copied to the device every token
        presence = (seen if seen is not None
                    else session.backend.allocate((batch, m.vocab_size), "bool"))
        feeds = engine_sampler_feeds(o, batch, seed, presence)
    eos = np.array(m.tokenizer.eos_token_ids or [-1], np.int64)
    result = GenerationResult([[] for _ in prompts], ["length"] * batch, lengths.tolist())
    done = np.zeros(batch, bool)
    cache = session.new_cache(batch)

    def pick(out: dict) -> np.ndarray:
        if host is not None:
            return host(out[LAST_LOGITS], seen)
        return np.asarray(out[TOKEN_IDS], np.int64)

    t0 = time.perf_counter()
    ids = np.zeros((batch, int(lengths.max())), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    nxt = pick(session.step(cache, ids, np.zeros(batch, np.int64), lengths, ids.shape[1], feeds))
    for step in range(options.max_new_tokens):
        if step == 0:
            result.prefill_s = time.perf_counter() - t0
        record_tokens(result, nxt, done, seen, eos, options, on_token)
        if done.all() or step == options.max_new_tokens - 1:
            break
        t = time.perf_counter()
        if on_device:
            feeds["offset"] = np.full(batch, step + 1, np.int64)  # the Philox counter
        out = session.step(cache, nxt[:, None], lengths, lengths + 1, session.s_max, feeds)
        lengths = lengths + 1
        nxt = pick(out)
        result.step_s.append(time.perf_counter() - t)
    return result
