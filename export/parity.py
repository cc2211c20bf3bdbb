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


@dataclass
class ParityCall:
    """One step of the parity run: a block of tokens for every row (1-D, its own length)."""

    key: str  # the output it is scored under: logits/prefill, logits/decode, logits/step
    where: str  # "... seq {b}"
    rows: list[np.ndarray]


def parity_plan(*, vocab_size: int, prompt_lengths=(7, 4), decode_steps: int = 4, seed: int = 0,
                step_width: int = 0) -> list[ParityCall]:
    """Ragged prompts, then decode steps, then (step_width > 0: the bundle has the general-step
    graph and room for it) one ragged multi-token step after the past."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab_size, size=n) for n in prompt_lengths]
    steps = rng.integers(0, vocab_size, size=(decode_steps, len(prompts)))
    plan = [ParityCall("logits/prefill", "seq {b}", prompts)]
    plan += [ParityCall("logits/decode", f"step {t} seq {{b}}", [steps[t][b:b + 1] for b in
                                                                range(len(prompts))])
             for t in range(decode_steps)]
    if step_width:
        new_lens = np.maximum(step_width - np.arange(len(prompts)), 1)  # (3, 2, ...): ragged
        block = rng.integers(0, vocab_size, size=(len(prompts), step_width))
        plan.append(ParityCall("logits/step", "seq {b}", [block[b, :n] for b, n in
                                                          enumerate(new_lens)]))
    return plan


def step_width(prompt_lengths, decode_steps: int, general_steps: bool, max_seq_len: int) -> int:
    """STEP_WIDTH where the bundle has the general-step graph and the cache room, else 0."""
    longest = max(prompt_lengths) + decode_steps
    return STEP_WIDTH if general_steps and longest + STEP_WIDTH <= max_seq_len else 0


def reference_outputs(reference: ReferenceStep, plan: list[ParityCall]) -> list[list[tuple]]:
    """(logits, keys) of every call and row, each row alone with its own cache. Run before
    the bundle is opened, so the PyTorch model can be freed first (never both in memory)."""
    states: list[Any] = [None] * len(plan[0].rows)
    out = []
    for call in plan:
        row_out = []
        for b, tokens in enumerate(call.rows):
            ref, keys, states[b] = reference(tokens[None, :].astype(np.int64), states[b])
            row_out.append((ref, keys))
        out.append(row_out)
    return out


def compare_outputs(session, plan: list[ParityCall], refs: list[list[tuple]], *, atol: float
                    ) -> ParityReport:
    """Run the plan through the bundle's runtime (the whole batch, right-padded, one cache)
    and score it against `refs` (reference_outputs)."""
    first = plan[0].rows
    decodes = sum(c.key == "logits/decode" for c in plan)
    report = ParityReport(atol, batch=len(first), prompt_lengths=tuple(len(r) for r in first),
                          decode_steps=decodes)
    longest = sum(max(len(r) for r in c.rows) for c in plan)
    cache = session.new_cache(len(first), longest)
    for call, ref_rows in zip(plan, refs):
        if call.key == "logits/step" and hasattr(session, "drop_fused"):
            session.drop_fused()  # the last call: the general-step graph maps the weights anew
        lens = np.array([len(r) for r in call.rows], dtype=np.int64)
        ids = np.zeros((len(lens), int(lens.max())), dtype=np.int64)
        for b, r in enumerate(call.rows):
            ids[b, :len(r)] = r
        got = session.step(cache, ids, lens)
        for b, (ref, keys) in enumerate(ref_rows):
            report.stat(call.key).update(got[b, :lens[b]], ref[0], call.where.format(b=b))
            _compare_cache(report, session, cache, b, keys)
    return report


def check_parity(reference: ReferenceStep, session, *, atol: float, vocab_size: int,
                 prompt_lengths=(7, 4), decode_steps: int = 4, seed: int = 0) -> ParityReport:
    """Compare logits and the cached keys/values (the reference and the session both live)."""
    width = step_width(prompt_lengths, decode_steps, getattr(session, "general_steps", False),
                       session.kv.max_seq_len)
    plan = parity_plan(vocab_size=vocab_size, prompt_lengths=prompt_lengths,
                       decode_steps=decode_steps, seed=seed, step_width=width)
    return compare_outputs(session, plan, reference_outputs(reference, plan), atol=atol)


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
