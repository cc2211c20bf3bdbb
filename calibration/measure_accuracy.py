"""Measure the accuracy table of every scheme on one fp32 bundle (the docs' table).

    python -m arx.calibration.measure_accuracy /tmp/tiny.arx \
        --data models/arx-tiny/calib.txt --eval-data models/arx-tiny/eval.txt

Quantizes with each scheme (gates off: every variant is measured, none is refused), prints a
Markdown table of perplexity, top-1 agreement and KL, and writes the bundles under --out.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from arx.calibration.calibrator import calibrate_bundle
from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
from arx.calibration.report import percent

# (label, quantization options): the default of each scheme, plus SmoothQuant for w8a8
VARIANTS = (
    ("w8a8", QuantOptions(scheme="w8a8")),
    ("w8a8 + SmoothQuant 0.5", QuantOptions(scheme="w8a8", smoothquant=0.5)),
    ("w8", QuantOptions(scheme="w8")),
    ("w4", QuantOptions(scheme="w4")),
)


def measure(bundle: Path, data: DataOptions, out_dir: Path, *, progress: bool) -> list[tuple[str, object]]:
    rows = []
    for i, (label, quant) in enumerate(VARIANTS):
        out = out_dir / f"{bundle.stem}-{label.split()[0]}-{i}.arx"
        opts = CalibrateOptions(quant=quant, data=data, force=True, overwrite=True, progress=progress)
        rows.append((label, calibrate_bundle(bundle=bundle, output=out, options=opts).report))
    return rows


def markdown(rows) -> str:
    fp = rows[0][1].metrics
    lines = ["| scheme | perplexity | vs fp32 | top-1 agreement | mean KL(fp32‖q) | gate |",
             "|---|---|---|---|---|---|",
             f"| fp32 | {fp.ppl_fp32:.3f} | – | 100% | 0 | – |"]
    for label, r in rows:
        m = r.metrics
        lines.append(f"| {label} | {m.ppl_quant:.3f} | {m.ppl_increase:+.2%} | {m.top1_agreement:.2%} | "
                     f"{m.kl_mean:.5f} | {'pass' if r.passed else 'FAIL'} ({percent(r.gate)}) |")
    lines.append(f"\n{fp.tokens} held-out tokens.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--out", type=Path, help="folder for the quantized bundles (default: a temp folder)")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    data = DataOptions(path=a.data, eval_path=a.eval_data, samples=a.samples, seq_len=a.seq_len,
                       eval_samples=a.eval_samples)
    with tempfile.TemporaryDirectory(prefix="arx-measure-") as tmp:
        out_dir = a.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = measure(a.bundle, data, out_dir, progress=not a.quiet)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
