"""The engine check of a next-scale (VAR) bundle: the whole scale schedule, block steps of
embeddings with every position's logits, against the bundle's general-step graph on ORT.

    reference  runtime/var_generate.generate_var on the bundle (DecoderSession, block mask):
               one image of class CHECK_CLASS with guidance, so rows [cond; null], greedy;
               var_class and each var_next_input_k make the real inputs of every scale
               ─► per scale: inputs_embeds (2, n_k, Cvae + D) and logits (2, n_k, V);
                  after the last scale each layer's cache (its valid positions)
    engine     the same inputs_embeds per scale, fed by the VarEngineSession that
               `arx generate --engine` runs (past_lengths, new_lengths = n_k, position_ids)

The engine is teacher-forced with the reference's inputs (as the text check feeds fixed ids), so
each scale's logits compare one to one; its own cache carries from scale to scale, so a wrong
layer shows in that layer's cache, not just in the logits. The check data are saved in the
kits' .npz format and compared by trt_check.py unchanged: it compares whichever outputs the
steps have, "logits" here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest

from . import trt_check
from .check import _host
from .check import _Recorder as _TextRecorder

CHECK_CLASS = 1  # any valid class; 1 rather than 0, which a class table may leave untrained
LOGITS = "logits"


class _Recording:
    """A DecoderSession behind generate_var's session API that keeps each scale's inputs and
    logits, and the cache after the latest step (generate_var closes the cache itself)."""

    def __init__(self, session, manifest: Manifest, s_max: int):
        self.session, self.manifest, self.s_max = session, manifest, s_max
        self.embeds: list[np.ndarray] = []
        self.outputs: list[dict[str, np.ndarray]] = []

    def new_cache(self, rows: int, max_len: int | None = None):
        return self.session.new_cache(rows, self.s_max)

    def step(self, cache, ids, new_lens, *, logits="all", mask="block", inputs_embeds=None):
        out = self.session.step(cache, ids, new_lens, logits=logits, mask=mask,
                                inputs_embeds=inputs_embeds)
        self.embeds.append(np.array(inputs_embeds, np.float32))
        self.outputs.append({LOGITS: np.array(out, np.float32)})
        buffers = {present: _host(cache.buffers[past]) for past, present in self.manifest.kv.pairs()}
        self.cache = trt_check.valid_cache(buffers, cache.lengths)
        return out


def reference_schedule(bundle: Path, manifest: Manifest, s_max: int) -> tuple[list, list]:
    """(inputs_embeds per scale, ORT outputs per scale: logits, and the caches at the last)."""
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.sampler import SamplingOptions
    from arx.runtime.var_generate import VarOptions, VarStages, generate_var, var_info

    info = var_info(manifest, bundle)
    if s_max < info.tokens:
        raise ArxError(f"the engine check runs the whole scale schedule ({info.tokens} tokens) "
                       f"but the cache holds {s_max}; build with --max-seq-len >= {info.tokens}")
    # guidance on, whatever the bundle's default, so the null rows are stepped too
    options = VarOptions(cfg=info.cfg_scale or 1.0, sampling=SamplingOptions(do_sample=False))
    with DecoderSession(bundle, manifest=manifest) as session, \
            VarStages(bundle, manifest, info) as stages:
        recording = _Recording(session, manifest, s_max)
        generate_var(recording, stages, [CHECK_CLASS % info.num_classes], options)
    recording.outputs[-1].update(recording.cache)
    return recording.embeds, recording.outputs


class _Recorder(_TextRecorder):
    """check.py's recording backend, returning every position's (zero) logits."""

    def run(self, feeds):
        self.feeds.append(dict(feeds))
        b, n = feeds["inputs_embeds"].shape[:2]
        return {LOGITS: np.zeros((b, n, self.vocab_size), np.float32)}


def engine_feeds(manifest: Manifest, io: dict, s_max: int, embeds: list) -> list[dict]:
    """The engine's feeds for the schedule minus the cache (the runner carries it)."""
    from arx.runtime.engine_session import EngineSession
    from arx.runtime.var_generate import VarEngineSession

    rows = len(embeds[0])
    vocab = next(t for t in io["outputs"] if t["name"] == LOGITS)["shape"][-1]
    recorder = _Recorder(int(vocab))
    session = VarEngineSession(EngineSession(recorder, {"io": io, "max_seq_len": s_max,
                                                        "max_batch": rows}, manifest))
    cache = session.new_cache(rows, sum(e.shape[1] for e in embeds))
    for e in embeds:
        session.step(cache, None, np.full(rows, e.shape[1], np.int64), inputs_embeds=e)
    pasts = {past for past, _ in manifest.kv.pairs()}
    return [{k: np.asarray(v) for k, v in f.items() if k not in pasts} for f in recorder.feeds]


def var_check_data(bundle: Path, manifest: Manifest, io: dict, s_max: int) -> tuple[list, list]:
    """(engine feeds, reference outputs) of the whole schedule (check.check_data's contract)."""
    embeds, reference = reference_schedule(bundle, manifest, s_max)
    return engine_feeds(manifest, io, s_max, embeds), reference


def describe(manifest: Manifest) -> str:
    """What the check steps are, for the kit's README."""
    pns = manifest.extensions["var"]["patch_nums"]
    return (f"the whole scale schedule ({len(pns)} block steps of embeddings, one image of class "
            f"{CHECK_CLASS} with its null row, greedy) against ONNX Runtime's outputs on the "
            f"bundle's general-step graph (check_reference.npz, made by arx): each output "
            f"(every position's logits per scale, every layer's cache after the last)")
