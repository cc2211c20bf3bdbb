#!/usr/bin/env python
"""Compile the arx Triton kernels to PTX for the TensorRT AOT plugins (no GPU needed).

    python scripts/compile_ptx.py --out build/ptx                 # every target, every variant
    python scripts/compile_ptx.py --out build/ptx --target sm_87  # one target (Orin)
    python scripts/compile_ptx.py --list                          # the variant tags

Runs with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
    from arx.plugins.aot import TARGETS, compile_all, default_variants

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, help="output folder (.ptx + .json)")
    ap.add_argument("--variant", action="append", help="variant tag (repeatable); default: all")
    ap.add_argument("--list", action="store_true", help="print the variant tags and exit")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS),
                    help="SM target (repeatable); default: all of " + ", ".join(TARGETS))
    args = ap.parse_args(argv)
    variants = default_variants()
    if args.list:
        print("\n".join(tag for tag, _ in variants))
        return 0
    if args.out is None:
        ap.error("--out is required")
    if args.variant:
        unknown = set(args.variant) - {tag for tag, _ in variants}
        if unknown:
            ap.error(f"unknown variant(s) {sorted(unknown)}; see --list")
        variants = [(tag, src) for tag, src in variants if tag in args.variant]
    written = compile_all(args.out, targets=tuple(args.target or TARGETS), variants=variants)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
