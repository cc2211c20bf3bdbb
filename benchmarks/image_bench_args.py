"""What bench_image.py and bench_var.py share: the command line (a shape, the batches, runs,
CFG, the quantized schemes) and the quantized bundles arx calibrate makes for their columns."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_image_bench(argv, description: str, shapes, *, batches: str, runs: int, cfg: float,
                      extra=None):
    """The shared flags; extra(parser) adds a script's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", choices=sorted(shapes), default="100m")
    p.add_argument("--batch", type=int, action="append", help=f"default: {batches}")
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--cfg", type=float, default=cfg)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here too")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def scheme_flags(default: str, samples: str):
    """extra= for parse_image_bench: --scheme (repeatable), --no-quantized, --calib-samples."""
    def add(p):
        p.add_argument("--scheme", action="append", choices=("w8a8", "w8", "w4"),
                       help=f"also time the bundle arx calibrate makes with this scheme "
                            f"(repeatable; default: {default})")
        p.add_argument("--no-quantized", action="store_true", help="fp32 bundle only")
        p.add_argument("--calib-samples", "--calib-images", type=int, default=16,
                       help=f"{samples} arx calibrate measures the ranges on (default 16)")
    return add


def schemes(args, default: str) -> list[str]:
    return [] if args.no_quantized else (args.scheme or [default])


def calibrated(bundle: Path, scheme: str, data) -> tuple[Path, dict]:
    """arx calibrate of `bundle` with `scheme` on DataOptions `data` (--force: random weights
    may miss the gate, the row reports the numbers): (its bundle, its accuracy section)."""
    from arx.calibration.calibrator import calibrate_bundle
    from arx.calibration.options import CalibrateOptions, QuantOptions

    out = bundle.with_name(f"{bundle.stem}-{scheme}.arx")
    options = CalibrateOptions(quant=QuantOptions(scheme=scheme), data=data, force=True,
                               progress=False, plot=False)
    result = calibrate_bundle(bundle=bundle, output=out, options=options)
    return out, result.manifest.extensions["quantization"]["accuracy"]
