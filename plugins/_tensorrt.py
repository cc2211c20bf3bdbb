"""Lazy access to `tensorrt.plugin` (the `gpu` extra).

The wheel on the package index is `tensorrt-cu13-bindings`, whose import name is
`tensorrt_bindings`; a full TensorRT install (or the `tensorrt` meta package) provides `tensorrt`.
Both expose the same `plugin` sub-package, and both need the TensorRT shared libraries.
"""

from __future__ import annotations

import importlib

from arx.errors import ArxError, MissingDependency

_CANDIDATES = ("tensorrt", "tensorrt_bindings")


def _import_first(suffix: str):
    errors = []
    for base in _CANDIDATES:
        try:
            return importlib.import_module(base + suffix)
        except ImportError as e:  # missing package or missing libnvinfer: try the other name
            errors.append(f"{base}{suffix}: {e}")
    if any("No module named" not in e for e in errors):
        raise ArxError("TensorRT Python bindings are installed but failed to import ("
                       + "; ".join(errors) + "); install the TensorRT libraries for this CUDA")
    raise MissingDependency("tensorrt", "gpu", "The arx TensorRT plugins")


def require_tensorrt():
    """Return the `tensorrt` module (under either import name)."""
    return _import_first("")


def require_trtp():
    """Return `tensorrt.plugin` (under either import name)."""
    return _import_first(".plugin")


def tensorrt_available() -> bool:
    """True when `tensorrt.plugin` imports (bindings and libraries present)."""
    try:
        require_trtp()
    except ArxError:
        return False
    return True
