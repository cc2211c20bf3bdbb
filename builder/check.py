"""The engine check, arx's side: the steps, ONNX Runtime's reference, the tolerance, the gate.

trt_check.py (shared verbatim with the kits as check_engine.py) runs the engine through
Polygraphy and compares. Here: the steps are a ragged prefill of fixed token ids and a few
decode steps, fed exactly as `arx generate --engine` feeds the engine (EngineSession builds
them); the reference is the bundle's own decoder on ONNX Runtime (DecoderSession, the graph
that passed the export's parity against PyTorch) over the same steps. Inside `arx build` both
run at once; a kit gets the steps and the reference as .npz files, so the device needs neither
the bundle nor onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest

from . import trt_check

# Allowed max error of each output, relative to the largest |value| ONNX Runtime gives it.
# fp32 as fp16: TensorRT runs fp32 MatMuls in TF32 (10 mantissa bits, like fp16) by default;
# bf16 has 7 mantissa bits; int8 is compared with the same Q/DQ graph on ORT, so what is left is
# fp16 float parts and activations rounding to a neighbouring int8 level.
TOLERANCES = {"fp32": 1e-2, "fp16": 1e-2, "bf16": 3e-2, "int8": 5e-2}
CHECK_INPUTS, CHECK_REFERENCE, CHECK_SCRIPT = "check_inputs.npz", "check_reference.npz", \
    "check_engine.py"
POLYGRAPHY = "0.53.6"  # the version the gpu extra pins; what a kit's README asks for
PROMPT_LENS, DECODE_STEPS = (7, 4), 4  # two ragged rows; short, so any S_max >= 16 holds them


def check_steps(manifest: Manifest, s_max: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids (B, S) right-padded, new_lens (B,)) per step: a ragged prefill of fixed pseudo-
    random token ids, then DECODE_STEPS single-token steps."""
    if s_max < max(PROMPT_LENS) + DECODE_STEPS:
        raise ArxError(f"the engine check needs a cache of at least "
                       f"{max(PROMPT_LENS) + DECODE_STEPS} tokens (got {s_max}); build with a "
                       f"larger --max-seq-len")
    rng = np.random.default_rng(0)
    high = min(manifest.vocab_size, 32000)
    ids = np.zeros((len(PROMPT_LENS), max(PROMPT_LENS)), np.int64)
    for b, n in enumerate(PROMPT_LENS):
        ids[b, :n] = rng.integers(1, high, n)
    steps = [(ids, np.array(PROMPT_LENS, np.int64))]
    for _ in range(DECODE_STEPS):
        steps.append((rng.integers(1, high, (len(PROMPT_LENS), 1)),
                      np.ones(len(PROMPT_LENS), np.int64)))
    return steps


class _Recorder:
    """An EngineSession backend that records each step's feeds (host arrays, no engine)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.feeds = vocab_size, []

    def allocate(self, shape, dtype):
        return np.zeros(shape, np.dtype(dtype))

    def release(self, buffer):
        pass

    def run(self, feeds):
        self.feeds.append(dict(feeds))
        b = feeds["past_lengths"].shape[0]
        return {trt_check.LOGITS: np.zeros((b, self.vocab_size), np.float32),
                trt_check.TOKEN_IDS: np.zeros(b, np.int32)}


def step_feeds(manifest: Manifest, io: dict, s_max: int, steps,
               embeds: list | None = None) -> list[dict[str, np.ndarray]]:
    """The engine's feeds for `steps` minus the cache (the runner carries it): built by the
    EngineSession that `arx generate --engine` runs, with greedy sampler inputs; embeds: the
    steps' ids embedded, for an engine that takes inputs_embeds (Janus)."""
    from arx.runtime.engine_session import TOKEN_IDS, EngineSession
    from arx.runtime.sampler import SamplingOptions

    recorder = _Recorder(manifest.vocab_size)
    session = EngineSession(recorder, {"io": io, "max_seq_len": s_max,
                                       "max_batch": len(PROMPT_LENS)}, manifest)
    cache = session.new_cache(len(PROMPT_LENS))
    session.device_sampling(cache, SamplingOptions(seed=0), None)  # greedy: the seed is unused
    for (ids, lens), e in zip(steps, embeds or [None] * len(steps)):
        (session.step_tokens if TOKEN_IDS in session.outputs else session.step)(
            cache, ids, lens, inputs_embeds=e)
    pasts = {past for past, _ in manifest.kv.pairs()}
    return [{k: np.asarray(v) for k, v in f.items() if k not in pasts} for f in recorder.feeds]


def reference_outputs(bundle: Path, manifest: Manifest, steps, s_max: int) -> list[dict]:
    """ONNX Runtime on the bundle's decoder: last_logits (B, V) per step, and each layer's
    cache (valid positions, under the present names) after the last step."""
    from arx.runtime.decoder import DecoderSession

    outputs = []
    with DecoderSession(bundle) as session:
        cache = session.new_cache(len(steps[0][1]), s_max)
        for ids, lens in steps:
            logits = session.step(cache, ids, lens, logits="last")
            outputs.append({trt_check.LOGITS: np.asarray(logits[:, 0], np.float32)})
        buffers = {present: _host(cache.buffers[past]) for past, present in manifest.kv.pairs()}
        outputs[-1].update(trt_check.valid_cache(buffers, cache.lengths))
    return outputs


def _host(buffer: Any) -> np.ndarray:
    return buffer.numpy() if hasattr(buffer, "numpy") else np.asarray(buffer)


def check_data(bundle: Path, manifest: Manifest, io: dict, s_max: int) -> tuple[list, list]:
    """(engine feeds, reference outputs) of the check steps."""
    if manifest.pipeline.kind == "next-scale":  # whole scales of embeddings (var_check.py)
        from .var_check import var_check_data

        return var_check_data(bundle, manifest, io, s_max)
    steps = check_steps(manifest, s_max)
    embeds = None
    if any(t["name"] == "inputs_embeds" for t in io["inputs"]):  # the ids the reference embeds
        from arx.runtime.decoder import DecoderSession

        with DecoderSession(bundle) as session:
            embeds = [session.embed(ids) for ids, _ in steps]
    return (step_feeds(manifest, io, s_max, steps, embeds),
            reference_outputs(bundle, manifest, steps, s_max))


def tolerance(precision: str, io: dict) -> float:
    """The precision's; an int8 KV cache in an fp16/bf16 engine gets int8's: the engine quantizes
    keys and values it computed in fp16, so a code may land a step from ORT's fp32 rounding
    (measured on the tiny Llama: last logits 0.225 apart, 2.7x the fp16 tolerance)."""
    int8_cache = any(t["dtype"] == "int8" for t in io.get("inputs", ()))
    if int8_cache and precision != "fp32":
        return max(TOLERANCES[precision], TOLERANCES["int8"])
    return TOLERANCES[precision]


def check_runner(runner, bundle: Path, manifest: Manifest, io: dict, s_max: int,
                 precision: str) -> dict:
    """Check a Polygraphy runner of the engine (TrtRunner; ORT in the tests) against ONNX
    Runtime on the bundle's graph; returns the report (trt_check.compare)."""
    from .image_form import check_codebook

    feeds, reference = check_data(bundle, manifest, io, s_max)
    aliases = {present: past for past, present in manifest.kv.pairs()}
    return trt_check.run_check(trt_check.cache_carrier(runner, aliases), feeds, reference,
                               precision, tolerance(precision, io), check_codebook(manifest))


def check_engine_file(engine: Path, bundle: Path, manifest: Manifest, io: dict, s_max: int,
                      precision: str) -> dict:
    """The check of a freshly built engine (plugins already registered by the build)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine))))
    return check_runner(runner, bundle, manifest, io, s_max, precision)


def gate(report: dict, force: bool) -> None:
    """Refuse an engine over its tolerance in one line, unless --force (then it is recorded)."""
    report["forced"] = bool(force and not report["passed"])
    if not report["passed"] and not force:
        raise ArxError(f"engine check failed: {report['message']}; the engine was not kept. "
                       f"Try a higher --precision or --no-plugins, or pass --force to keep it "
                       f"(the errors go into the build report)")


def save_steps(path: Path, steps: list[dict[str, np.ndarray]]) -> None:
    """Per-step dicts as one .npz, keys "<step>/<name>" (trt_check.load_steps reads it)."""
    np.savez_compressed(path, **{f"{i}/{k}": v for i, step in enumerate(steps) for k, v in step.items()})


def write_kit_check(folder: Path, bundle: Path, manifest: Manifest, io: dict, s_max: int,
                    precision: str, plugins: bool) -> dict:
    """The kit's check data and the command line build_engine.py runs (kit.json "check")."""
    feeds, reference = check_data(bundle, manifest, io, s_max)
    save_steps(folder / CHECK_INPUTS, feeds)
    save_steps(folder / CHECK_REFERENCE, reference)
    argv = [CHECK_SCRIPT, "--engine", "decoder.engine", "--inputs", CHECK_INPUTS,
            "--reference", CHECK_REFERENCE, "--kit-json", "kit.json", "--precision", precision,
            "--tolerance", repr(tolerance(precision, io)), "--report", "build_report.json"]
    if plugins:
        argv += ["--plugins", "plugins"]
    return {"argv": argv, "precision": precision, "tolerance": tolerance(precision, io),
            "files": [CHECK_SCRIPT, CHECK_INPUTS, CHECK_REFERENCE]}
