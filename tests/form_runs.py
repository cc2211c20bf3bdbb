"""Shared by the TensorRT-form tests: make a form, run it on ORT (plugins as NumPy PyOps) and
run the bundle's own graph on the same ragged prefill + decode steps."""

from __future__ import annotations

import numpy as np

from arx.builder.form import make_tensorrt_form
from arx.builder.options import BuildOptions
from arx.manifest import read_manifest

PROMPTS = [[1, 17, 33, 99, 5, 12, 80], [1, 64, 3, 8]]
S_MAX = 24  # the static cache of most tests (the sequences here stay shorter)
DECODE_STEPS = 4
MISTRAL_WINDOW = 24  # sliding_window of the tiny Mistral (tests/tiny_models.py)


def form_for(bundle, **kw):
    opts = BuildOptions(target=kw.pop("target", "h100"), max_seq_len=kw.pop("max_seq_len", S_MAX),
                        precision=kw.pop("precision", "fp32"), **kw)
    return make_tensorrt_form(bundle, read_manifest(bundle), opts)


def run_reference(bundle, steps, s_max=S_MAX):
    """The bundle's own graph on ORT: the per-step last-token logits (B, V)."""
    from arx.runtime.decoder import DecoderSession

    with DecoderSession(bundle) as session:
        cache = session.new_cache(len(steps[0][1]), s_max)
        out = []
        for ids, lens in steps:
            logits = session.step(cache, ids, lens)
            out.append(logits[np.arange(len(lens)), lens - 1])
    return out


def run_form(ort_session, model, manifest, steps, s_max=S_MAX,
              outputs=("last_logits", "token_ids")):
    """The TensorRT form on ORT + PyOps; returns [(last_logits, token_ids)] (or the named
    outputs) per step."""
    session = ort_session(model)
    types = {i.name: i.type for i in session.get_inputs()}
    b, kv = len(steps[0][1]), manifest.kv
    cache_type = types[kv.pairs()[0][0]]
    dtype = np.float16 if "float16" in cache_type else np.int8 if "int8" in cache_type else np.float32
    caches = {p: np.zeros((b, kv.kv_heads, s_max, kv.head_dim), dtype) for p, _ in kv.pairs()}
    lengths, results = np.zeros(b, np.int64), []
    for ids, lens in steps:
        totals = lengths + lens
        feeds = {"input_ids": ids, **caches, "past_lengths": lengths,
                 "new_lengths": np.asarray(lens, np.int64),
                 "sampling_params": np.tile(np.float32([0, 0, 1, 1, 1]), (b, 1)),  # greedy
                 "presence": np.zeros((b, manifest.vocab_size), bool),
                 "seed": np.zeros(b, np.int64), "offset": np.zeros(b, np.int64),
                 "row": np.arange(b, dtype=np.int64)}
        if "position_ids" in types:
            feeds["position_ids"] = (lengths[:, None] + np.arange(ids.shape[1])[None]).astype(np.int64)
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in types})))
        for past, present in kv.pairs():
            caches[past] = out[present]  # ORT has no aliasing: feed the updated cache back
        lengths = totals
        results.append(tuple(out[name] for name in outputs))
    return results


def ragged_steps(prompts=PROMPTS, decode_steps=DECODE_STEPS):
    """Ragged prefill, then single-token decode steps (fixed pseudo-random tokens)."""
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    steps = [(ids, np.array([len(p) for p in prompts]))]
    rng = np.random.default_rng(0)
    for _ in range(decode_steps):
        steps.append((rng.integers(3, 150, (len(prompts), 1)), np.ones(len(prompts), np.int64)))
    return steps


def window_steps():
    """Prompts of 30 and 19 tokens (prefill over and under the window of 24), then 8 decode
    steps: both rows end past the window (38 and 27 tokens)."""
    rng = np.random.default_rng(3)
    return ragged_steps([list(rng.integers(3, 150, 30)), list(rng.integers(3, 150, 19))], 8)
