"""Accuracy of a quantized bundle against its fp32 source, on held-out token sequences.

Model-level metrics run through the real runtime (`DecoderSession.step`, the same path
`arx generate` takes), prefilling batches of right-padded sequences:

    perplexity  exp(mean NLL of each next token), fp32 and quantized
    top-1       share of positions where both pick the same next token
    KL          mean over positions of KL(p_fp32 || p_quant) of the next-token distributions

Per-linear error (which layers to blame) compares intermediate tensors of the two graphs on the
same inputs (`Probe`: the tensors exposed as extra graph outputs). For every quantized MatMul:

    err_in  = ||x_q - x_ref|| / ||x_ref||   its input   (error arriving from earlier layers)
    err_out = ||y_q - y_ref|| / ||y_ref||   its output
    added   = err_out - err_in              what quantizing this MatMul contributed

Ranked by `added`, so a late layer is not blamed for error it merely inherits. The reference
is the fp32 graph after SmoothQuant folding (exact), whose MatMul inputs match the quantized
graph's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arx.progress import bar

BATCH = 4  # sequences per prefill; small enough for a 32k vocabulary's logits on a laptop


@dataclass
class ModelMetrics:
    ppl_fp32: float
    ppl_quant: float
    top1_agreement: float
    kl_mean: float
    tokens: int

    @property
    def ppl_increase(self) -> float:
        return self.ppl_quant / self.ppl_fp32 - 1.0


@dataclass
class LayerError:
    name: str
    err_in: float
    err_out: float

    @property
    def added(self) -> float:
        return self.err_out - self.err_in


@dataclass
class MetricSums:
    """Running sums of the model-level metrics over scored positions."""

    nll_fp: float = 0.0
    nll_q: float = 0.0
    agree: int = 0
    kl: float = 0.0
    n: int = 0

    def add(self, ref: "RefRows", lp_q: np.ndarray, targets: np.ndarray) -> None:
        """lp_q (T, V) log-probabilities predicting targets (T,); ref the reference's rows."""
        rows = np.arange(len(targets))
        self.nll_fp -= float(ref.target.sum())
        self.nll_q -= float(lp_q[rows, targets].sum())
        self.agree += int((ref.top1 == lp_q.argmax(-1)).sum())
        self.kl += ref.kl(lp_q)
        self.n += len(targets)

    def metrics(self) -> "ModelMetrics":
        return ModelMetrics(ppl_fp32=float(np.exp(self.nll_fp / self.n)),
                            ppl_quant=float(np.exp(self.nll_q / self.n)),
                            top1_agreement=self.agree / self.n, kl_mean=self.kl / self.n,
                            tokens=self.n)


LOG_SOFTMAX_ROWS = 16  # rows a pass: each pass's exp stays in cache
EXP_FLOOR = -700.0


def log_softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float64 log-softmax over the last axis, into `out` (float64, x's shape) or one new
    array: the same arithmetic row by row as the textbook form, written in place
    LOG_SOFTMAX_ROWS rows at a time (four (.., V) float64 temporaries made it 9.6 s of the 1B
    w4 export's gate, on 32 x 128 x 128k logits)."""
    if out is None:
        out = x.astype(np.float64)
    else:
        np.copyto(out, x)
    rows = out.reshape(-1, out.shape[-1]) if out.size else out
    for i in range(0, len(rows), LOG_SOFTMAX_ROWS):
        block = rows[i:i + LOG_SOFTMAX_ROWS]
        block -= block.max(axis=-1, keepdims=True)
        # exp of x - max below EXP_FLOOR is under 1e-304: to the row's sum (>= 1) it adds
        # nothing in float64 either way, but its subnormal or underflowing result takes exp's
        # slow path (a random-weight 1B model's logits span ~800: 3x the time of the pass)
        block -= np.log(np.exp(np.maximum(block, EXP_FLOOR)).sum(axis=-1, keepdims=True))
    return out


def _batches(samples: list[np.ndarray], size: int = BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids (B, S) right-padded, lens (B,)) for prefills of `size` sequences."""
    out = []
    for i in range(0, len(samples), size):
        batch = samples[i: i + size]
        lens = np.array([len(s) for s in batch], dtype=np.int64)
        ids = np.zeros((len(batch), int(lens.max())), dtype=np.int64)
        for b, s in enumerate(batch):
            ids[b, : len(s)] = s
        out.append((ids, lens))
    return out


def _log_probs(session, ids: np.ndarray, lens: np.ndarray, out: np.ndarray | None = None
               ) -> np.ndarray:
    logits = session.step(session.new_cache(len(ids), int(lens.max())), ids, lens)
    return log_softmax(logits, out if out is not None and out.shape == logits.shape else None)


@dataclass
class RefRows:
    """What the metrics need of the reference's next-token distributions at T positions:
    all V log-probs (`idx` None, exact KL), or only the top-k (`idx` (T, k)), the rest of the
    vocabulary then one bucket in the KL (a lower bound of the full KL, by the log-sum
    inequality) - `arx export --quantize` keeps those while the reference model is freed."""

    target: np.ndarray  # (T,) log-prob of each target token
    top1: np.ndarray  # (T,) argmax id
    lp: np.ndarray  # (T, V) or (T, k) log-probs
    idx: np.ndarray | None = None  # (T, k) ids of lp's columns

    @classmethod
    def of(cls, lp: np.ndarray, targets: np.ndarray, top_k: int | None = None) -> "RefRows":
        rows = np.arange(len(targets))
        target, top1 = lp[rows, targets].astype(np.float64), lp.argmax(-1)
        if top_k is None or top_k >= lp.shape[-1]:
            return cls(target, top1, lp)
        values, idx = _top_k(lp, top_k)
        # float64 for the tail bucket's 1 - sum(p), which float32 leaves at ~1e-7 noise
        return cls(target, top1, values.astype(np.float64), idx)

    def kl(self, lp_q: np.ndarray) -> float:
        """sum over positions of KL(p_ref || p_q)."""
        if self.idx is None:
            return float((np.exp(self.lp) * (self.lp - lp_q)).sum())
        q = np.take_along_axis(lp_q, self.idx, -1)
        p_top = np.exp(self.lp)
        tail_p = np.clip(1.0 - p_top.sum(-1), 1e-300, 1.0)
        tail_q = np.clip(1.0 - np.exp(q).sum(-1), 1e-300, 1.0)
        return float((p_top * (self.lp - q)).sum() + (tail_p * np.log(tail_p / tail_q)).sum())


def _top_k(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, ids) of each row's k largest log-probs, largest first. torch's topk runs on
    every core and reads `lp` in place: numpy's argpartition of a negated copy took 0.12-0.27 s
    a 128-token row block of a 128k vocabulary (4 s of the 1B w4 export's gate), topk 0.02 s.
    Its one caller, the direct quantized export, has torch (the export extra)."""
    import torch

    values, idx = torch.from_numpy(np.ascontiguousarray(lp)).topk(k, dim=-1)
    return values.numpy(), idx.numpy()


def session_log_probs(session):
    """(ids, lens) -> log-probs (B, S, V) of a DecoderSession: a reference or a candidate. The
    array is the same one from call to call while the shape stays (overwritten by the next
    call: use it before): a fresh (B, S, V) float64 array a call cost its page faults, more
    than the log-softmax's arithmetic on the 1B shape's 128k vocabulary."""
    held: list[np.ndarray] = []

    def run(ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        lp = _log_probs(session, ids, lens, held[0] if held else None)
        held[:] = [lp]
        return lp

    return run


def reference_rows(reference, samples: list[np.ndarray], top_k: int | None = None, *,
                   progress: bool = False, label: str = "reference", batch: int = BATCH
                   ) -> list[RefRows]:
    """RefRows of each sample under `reference` ((ids, lens) -> log-probs), in sample order;
    `batch` sequences a call (fewer: smaller (B, S, V) log-probs in flight)."""
    out = []
    batches = _batches(samples, batch)
    for ids, lens in bar(batches, label, total=len(batches), enabled=progress):
        lp = reference(ids, lens)
        out.extend(RefRows.of(lp[b, : n - 1], ids[b, 1:n], top_k) for b, n in enumerate(lens))
    return out


def compare(reference, candidate, samples: list[np.ndarray], *, progress: bool,
            rows: list[RefRows] | None = None, batch: int = BATCH) -> ModelMetrics:
    """Metrics of `candidate` against `reference` (each (ids, lens) -> log-probs), or against
    `rows` the reference left (reference_rows) when it no longer runs."""
    sums = MetricSums()
    batches = _batches(samples, batch)
    at = 0
    for ids, lens in bar(batches, "evaluating", total=len(batches), enabled=progress):
        lp_ref = reference(ids, lens) if rows is None else None
        lp_q = candidate(ids, lens)
        for b, n in enumerate(lens):
            ref = rows[at] if rows is not None else RefRows.of(lp_ref[b, : n - 1], ids[b, 1:n])
            sums.add(ref, lp_q[b, : n - 1], ids[b, 1:n])
            at += 1
    return sums.metrics()


def model_metrics(fp_bundle: Path, q_bundle: Path, samples: list[np.ndarray], *, progress: bool) -> ModelMetrics:
    from arx.runtime.decoder import DecoderSession

    with DecoderSession(fp_bundle) as fp, DecoderSession(q_bundle) as q:
        return compare(session_log_probs(fp), session_log_probs(q), samples, progress=progress)


def perplexity(bundle: Path, samples: list[np.ndarray]) -> float:
    """Perplexity of one bundle, computed exactly as model_metrics computes ppl_quant."""
    from arx.runtime.decoder import DecoderSession

    nll, n = 0.0, 0
    with DecoderSession(bundle) as session:
        for ids, lens in _batches(samples):
            lp = _log_probs(session, ids, lens)
            for b, k in enumerate(lens):
                nll -= float(lp[b, np.arange(k - 1), ids[b, 1:k]].sum())
                n += int(k) - 1
    return float(np.exp(nll / n))


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))


def layer_errors(ref_probe, q_probe, linears, samples: list[np.ndarray], *, progress: bool) -> list[LayerError]:
    """Per quantized linear: relative error of its input and output, averaged over samples.

    `ref_probe` and `q_probe` are `graph.Probe`s exposing each linear's input and output.
    """
    sums = {lin.node: [0.0, 0.0] for lin in linears}
    for ids in bar(samples, "per-layer error", total=len(samples), enabled=progress):
        ref, q = ref_probe.run(ids), q_probe.run(ids)
        for lin in linears:
            sums[lin.node][0] += _rel(q[lin.input], ref[lin.input])
            sums[lin.node][1] += _rel(q[lin.output], ref[lin.output])
    n = max(len(samples), 1)
    errors = [LayerError(name, e_in / n, e_out / n) for name, (e_in, e_out) in sums.items()]
    return sorted(errors, key=lambda e: e.added, reverse=True)
