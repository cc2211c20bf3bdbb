"""`arx` command line: maps flags onto each stage's options dataclass and calls the stage.

Each subcommand lives in arx/commands/<name>.py with `register(subparsers)`; those modules
import nothing heavy at import time, so `arx --help` is instant and works without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from arx import __version__
from arx.errors import ArxError
from arx.interrupts import interrupts_outside_imports

# Order is the order shown in `arx --help`.
COMMANDS = ("export", "inspect", "generate", "calibrate", "profile", "build", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arx",
        description="Export autoregressive models to ONNX bundles, quantize, build and run them.",
    )
    parser.add_argument("--version", action="version", version=f"arx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"arx.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        with interrupts_outside_imports():  # else a C extension may turn Ctrl-C into ImportError
            return _dispatch(argv)
    except ArxError as e:
        print(f"arx: error: {e}", file=sys.stderr)
        if e.details:
            print(e.details, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("arx: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
