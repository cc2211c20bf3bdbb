"""What onnxruntime's int8 kernel costs a w8a8 bundle on this CPU, beside what its Q/DQ graph says.

    python benchmarks/int8_kernel_error.py FP32.arx W8A8.arx [W8A8-other.arx ...]

For each quantized bundle: the prefill logits of 32 tokens with ORT's graph optimizations on
(Q/DQ fused into integer MatMuls: the kernel users run) and off (DequantizeLinear then a float
MatMul: the graph computed exactly), each as the max error relative to the fp32 bundle's
largest logit. On a CPU whose int8 MatMul saturates (x86 without VNNI, docs/calibration.md
"--reduce-range") the fused error exceeds the exact one for 8-bit weights; with 7-bit weights
(`arx calibrate --reduce-range on`) the two are equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np

IDS = np.arange(5, 37, dtype=np.int64)


@contextlib.contextmanager
def graph_optimizations(level):
    """Every onnxruntime session made inside runs at `level` (the runtime sets its own)."""
    import onnxruntime as ort

    init = ort.InferenceSession.__init__

    def with_level(self, path, sess_options=None, *args, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        sess_options.graph_optimization_level = level
        init(self, path, sess_options, *args, **kwargs)

    ort.InferenceSession.__init__ = with_level
    try:
        yield
    finally:
        ort.InferenceSession.__init__ = init


def prefill_logits(bundle: Path, fused: bool = True) -> np.ndarray:
    import onnxruntime as ort

    from arx.runtime.decoder import DecoderSession

    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with graph_optimizations(level), DecoderSession(bundle) as s:
        return s.step(s.new_cache(1, len(IDS)), IDS[None, :], np.array([len(IDS)]))[0]


def errors(fp32: Path, quantized: Path) -> dict:
    ref = prefill_logits(fp32)
    scale = float(np.abs(ref).max())
    fused, exact = prefill_logits(quantized, True), prefill_logits(quantized, False)
    return {"bundle": str(quantized), "fused_kernel": float(np.abs(fused - ref).max()) / scale,
            "exact_qdq_graph": float(np.abs(exact - ref).max()) / scale}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fp32", type=Path)
    p.add_argument("quantized", type=Path, nargs="+")
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    from arx.runtime.int8_kernel import int8_matmul_saturates

    print(f"this CPU's int8 MatMul saturates: {int8_matmul_saturates()}")
    rows = [errors(a.fp32, q) for q in a.quantized]
    for r in rows:
        print(f"{r['bundle']}: fused int8 kernel {r['fused_kernel']:.2%}, "
              f"exact Q/DQ graph {r['exact_qdq_graph']:.2%}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
