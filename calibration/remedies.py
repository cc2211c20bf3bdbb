"""What a refused calibration should try next, measured before it is suggested.

A gate refusal that names a flag should name one that helps, and the report's numbers only
hint at which: a remedy that is cheap to try (an attribute change, a weight-only
re-quantization, w8a8 Q/DQ from the ranges already calibrated) is tried. The candidate decoder
runs on the same held-out text as the report, and the refusal prints its perplexity increase,
best first. Remedies that need a new calibration run (SmoothQuant, another method) or another
scheme are listed unmeasured, after them.

    weight-only at accuracy level 4   --accuracy-level 1   the same integers, fp32 compute
    every scheme                      --keep-fp WORST      the two layers that added most error
    weight-only                       --group-size g/2     smaller blocks, less weight error
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import onnx

from arx.calibration import graph as G
from arx.calibration.options import INT8_ACTIVATIONS, CalibrateOptions, QuantOptions
from arx.calibration.report import AccuracyReport

MEASURED = 2  # remedies tried at most: each costs one pass over the held-out text
FP32_COMPUTE = 1  # MatMulNBits accuracy_level with float activations


@dataclass
class Remedy:
    flags: str  # what to pass to arx calibrate
    build: Callable[[], onnx.ModelProto] | None = None  # the decoder it gives; None: not tried here
    ppl_increase: float | None = None  # measured on the held-out text

    def text(self, gate: float) -> str:
        if self.ppl_increase is None:
            return self.flags
        verdict = "passes" if self.ppl_increase <= gate else "still over"
        return f"{self.flags} (measured {self.ppl_increase:+.2%}, {verdict})"


def with_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of a MatMulNBits model with every node's accuracy_level set to `level`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", level)])
    return out


def candidates(report: AccuracyReport, options: CalibrateOptions, q, work: Path, *,
               text: bool = True) -> list[Remedy]:
    """Remedies in the order worth trying; `q` is the calibrator's quantized result; `text`:
    False for a next-scale bundle (SmoothQuant's statistics come from text prefills)."""
    o = options.quant
    worst = [e.name for e in report.worst(2)]
    keep_fp = f"--keep-fp {','.join(dict.fromkeys([*o.keep_fp, *worst]))}"
    kept = [*q.kept, *(n for n in worst if n not in q.kept)]
    quantize = [n for n in q.quantized if n not in worst]
    if o.spec.activations:
        from arx.calibration.static import requantize

        ranges = q.calibration["ranges"]
        smooth = [Remedy("--smoothquant 0.5" if o.smoothquant is None else
                         "another --smoothquant alpha (0.3-0.8)")] if text else []
        return [Remedy(keep_fp, lambda: requantize(q.reference, ranges, quantize, kept, o, work)),
                *smooth, Remedy("--method percentile" if o.method == "minmax" else "--method minmax")]
    out = []
    if o.level == INT8_ACTIVATIONS:
        out.append(Remedy(f"--accuracy-level {FP32_COMPUTE}", lambda: with_accuracy_level(q.model, FP32_COMPUTE)))
    out.append(Remedy(keep_fp, lambda: _weight_only(q.reference, o, kept)))
    if o.group_size > 16:
        smaller = replace(o, group_size=o.group_size // 2)
        out.append(Remedy(f"--group-size {smaller.group_size}", lambda: _weight_only(q.reference, smaller, q.kept)))
    if o.scheme == "w4":
        out.append(Remedy("--scheme w8"))
    return out


def _weight_only(reference: onnx.ModelProto, o: QuantOptions, kept: list[str]) -> onnx.ModelProto:
    from arx.calibration.weight_only import quantize_weight_only

    return quantize_weight_only(reference, bits=o.spec.weight_bits, group_size=o.group_size,
                                accuracy_level=o.level, exclude=kept)


def measure(remedies: list[Remedy], trial: Callable[[onnx.ModelProto], float]) -> list[Remedy]:
    """Try the first MEASURED buildable remedies; measured ones first, lowest increase first."""
    tried = 0
    for r in remedies:
        if r.build is not None and tried < MEASURED:
            r.ppl_increase, tried = trial(r.build()), tried + 1
    done = sorted((r for r in remedies if r.ppl_increase is not None), key=lambda r: r.ppl_increase)
    return done + [r for r in remedies if r.ppl_increase is None]


def trial(bundle: Path, decoder: str, samples, ppl_fp32: float, work: Path, score=None
          ) -> Callable[[onnx.ModelProto], float]:
    """A function giving a candidate decoder's perplexity increase over fp32 on `samples`,
    run through the runtime in a scratch copy of `bundle` (its tokenizer and manifest);
    score(scratch bundle) -> increase replaces the text perplexity (next-scale bundles)."""
    from arx.calibration.evaluate import perplexity

    def run(model: onnx.ModelProto) -> float:
        scratch = Path(work) / "remedy.arx"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for f in Path(bundle).iterdir():
            if f.is_file() and f.name not in (decoder, decoder + ".data"):
                shutil.copy2(f, scratch / f.name)
        G.save_model(model, scratch / decoder)
        if score is not None:
            return score(scratch)
        return perplexity(scratch, samples) / ppl_fp32 - 1.0

    return run


def advice(remedies: list[Remedy], gate: float) -> str:
    """'try A (measured +x%, passes) or B ...' for the refusal line."""
    return "try " + " or ".join(r.text(gate) for r in remedies)

