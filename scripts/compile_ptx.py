#!/usr/bin/env python
"""Compile the arx Triton kernels to PTX for the TensorRT AOT plugins (no GPU needed).

    python scripts/compile_ptx.py --out build/ptx                 # every target, every variant
    python scripts/compile_ptx.py --out build/ptx --target sm_87  # one target (Orin)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from arx.plugins.aot import TARGETS, compile_all

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (.ptx + .json)")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS),
                    help="SM target (repeatable); default: all of " + ", ".join(TARGETS))
    args = ap.parse_args(argv)
    written = compile_all(args.out, targets=tuple(args.target or TARGETS))
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
