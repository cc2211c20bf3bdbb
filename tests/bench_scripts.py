"""What the benchmark smoke tests share: a script of benchmarks/ loaded as a module."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """benchmarks/<name>.py as a module, loaded from its path (the scripts put benchmarks/ on
    sys.path themselves, for the siblings they import)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_script(name: str):
    """benchmarks/<name>.py imported by name, for a script whose dataclasses need their module in
    sys.modules; benchmarks/ stays on sys.path, as the scripts themselves leave it."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)
