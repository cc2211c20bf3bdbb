"""Parity at export: PyTorch and ONNX Runtime on the same inputs, prefill and decode steps.

The reference runs each sequence alone (batch 1, no padding); ORT runs the whole batch with
different lengths through the bundle's own runtime path (right-padded prefill, per-sequence
lengths, in-place cache), so padding and cache bookkeeping are checked too. Bundles with a
general-step graph also take one ragged multi-token step after the decode steps ("logits/step").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from arx.errors import ArxError

STEP_WIDTH = 3  # the multi-token step after decode (general-step graph), rows 3, 2, ... wide
# reference(tokens (1, S) int64, state) -> (logits (1, S, V), keys [(1, Hkv, T, D)] per layer, state)
ReferenceStep = Callable[[np.ndarray, Any], tuple[np.ndarray, list[np.ndarray], Any]]


@dataclass
class ErrorStats:
    max_abs: float = 0.0
    max_ref: float = 0.0
    where: str = ""

    def update(self, got: np.ndarray, ref: np.ndarray, where: str) -> None:
        err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        self.max_ref = max(self.max_ref, float(np.max(np.abs(ref))) if ref.size else 0.0)
        if err >= self.max_abs:
            self.max_abs, self.where = err, where

    def to_json(self) -> dict:
        rel = self.max_abs / self.max_ref if self.max_ref else 0.0
        return {"max_abs": self.max_abs, "max_rel": rel, "worst": self.where}


@dataclass
class ParityReport:
    atol: float
    stats: dict[str, ErrorStats] = field(default_factory=dict)
    batch: int = 0
    prompt_lengths: tuple[int, ...] = ()
    decode_steps: int = 0

    def stat(self, key: str) -> ErrorStats:
        return self.stats.setdefault(key, ErrorStats())

    @property
    def passed(self) -> bool:
        return all(s.max_abs <= self.atol for s in self.stats.values())

    def to_json(self) -> dict:
        return {"passed": self.passed, "atol": self.atol, "batch": self.batch,
                "prompt_lengths": list(self.prompt_lengths), "decode_steps": self.decode_steps,
                "outputs": {k: s.to_json() for k, s in self.stats.items()}}

    def table(self) -> str:
        rows = sorted(self.stats.items(), key=lambda kv: -kv[1].max_abs)
        lines = [f"{'output':<16}{'max abs':>12}{'max rel':>12}  worst at"]
        for k, s in rows:
            j = s.to_json()
            lines.append(f"{k:<16}{j['max_abs']:>12.3e}{j['max_rel']:>12.3e}  {j['worst']}")
        return "\n".join(lines)


def check_parity(reference: ReferenceStep, session, *, atol: float, vocab_size: int,
                 prompt_lengths=(7, 4), decode_steps: int = 4, seed: int = 0) -> ParityReport:
    """Compare logits and the cached keys/values; raise ArxError with a table when over atol."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, size=n) for n in prompt_lengths]
    steps = rng.integers(0, vocab_size, size=(decode_steps, len(prompts)))
    report = ParityReport(atol, batch=len(prompts), prompt_lengths=tuple(prompt_lengths),
                          decode_steps=decode_steps)
    lengths = np.array(prompt_lengths, dtype=np.int64)
    longest = int(lengths.max()) + decode_steps
    # then one ragged multi-token step after the past, where the bundle has the graph for it
    width = STEP_WIDTH if getattr(session, "general_steps", False) and \
        longest + STEP_WIDTH <= session.kv.max_seq_len else 0
    cache = session.new_cache(len(prompts), longest + width)
    ids = np.zeros((len(prompts), int(lengths.max())), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    got = session.step(cache, ids, lengths)
    states = []
    for b, p in enumerate(prompts):
        ref, keys, state = reference(p[None, :].astype(np.int64), None)
        states.append(state)
        report.stat("logits/prefill").update(got[b, : len(p)], ref[0], f"seq {b}")
        _compare_cache(report, session, cache, b, keys)
    for t in range(decode_steps):
        got = session.step(cache, steps[t][:, None], np.ones(len(prompts), dtype=np.int64))
        for b in range(len(prompts)):
            ref, keys, states[b] = reference(steps[t][b].reshape(1, 1).astype(np.int64), states[b])
            report.stat("logits/decode").update(got[b], ref[0], f"step {t} seq {b}")
            _compare_cache(report, session, cache, b, keys)
    if width:
        new_lens = np.maximum(width - np.arange(len(prompts)), 1)  # (3, 2, ...): ragged rows
        block = rng.integers(0, vocab_size, size=(len(prompts), width))
        got = session.step(cache, block, new_lens)
        for b, n in enumerate(new_lens):
            ref, keys, states[b] = reference(block[b:b + 1, :n].astype(np.int64), states[b])
            report.stat("logits/step").update(got[b, :n], ref[0], f"seq {b}")
            _compare_cache(report, session, cache, b, keys)
    return report


def _compare_cache(report: ParityReport, session, cache, b: int, ref_keys: list[np.ndarray]) -> None:
    """ref_keys: per layer the reference's whole key cache (1, Hkv, T, D) after this step."""
    if not session.in_place:
        return  # concat graphs return the cache; logits already cover it
    names = [past for past, _ in cache.layout.pairs()][0::2]
    for i, name in enumerate(names):
        buf = _host(cache.buffers[name])  # (B, Hkv, S_max, D)
        n = ref_keys[i].shape[2]
        report.stat("present.key").update(buf[b, :, :n], ref_keys[i][0], f"layer {i} seq {b}")


def _host(buffer) -> np.ndarray:
    return buffer if isinstance(buffer, np.ndarray) else buffer.numpy()


def hf_reference(model) -> ReferenceStep:
    """Reference steps from a Hugging Face causal LM with its own DynamicCache."""
    import torch

    order = _key_order(model)

    def step(tokens: np.ndarray, state):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(tokens), past_key_values=state, use_cache=True)
        cache = out.past_key_values
        keys = [layer.keys.float().numpy()[..., order] for layer in cache.layers]
        return out.logits.float().numpy(), keys, cache

    return step


def _key_order(model) -> slice | np.ndarray:
    """The bundle's key dims in terms of HF's: reordered where a partial rotary width was
    widened for GroupQueryAttention (export/rotary_layout.py), else as they are."""
    from arx.export.families import FAMILIES, family_for_model_type
    from arx.export.rotary_layout import head_permutation

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in {t for f in FAMILIES.values() for t in f.model_types}:
        return slice(None)
    perm = head_permutation(family_for_model_type(model_type).read_config(model.config))
    return slice(None) if perm is None else perm


def raise_if_failed(report: ParityReport, bundle_hint: str) -> None:
    if not report.passed:
        worst = max(report.stats.items(), key=lambda kv: kv[1].max_abs)
        raise ArxError(f"parity check failed: {worst[0]} differs from PyTorch by "
                       f"{worst[1].max_abs:.3e} > atol {report.atol:g} (at {worst[1].where}); "
                       f"if that error is acceptable for your use, re-run with --atol "
                       f"{worst[1].max_abs * 1.5:.1e}; {bundle_hint}", details=report.table())
