"""The command line bench_image.py and bench_var.py share: a shape, the batches, runs, CFG."""

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
