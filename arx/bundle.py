"""Atomic bundle writing: build in a temp folder beside the target, then rename into place.

A failed export, calibration or build leaves nothing half-made: either the complete new
bundle is at the output path, or the path is as it was before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from arx.errors import ArxError


def check_writable_output(out: Path, *, overwrite: bool) -> None:
    """Fail early (before hours of work) if `out` cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArxError(f"output {out} already exists; pass --overwrite to replace it or choose another -o")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ArxError(f"output folder {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK):
        raise ArxError(f"output folder {parent} is not writable; choose another -o")


@contextlib.contextmanager
def atomic_bundle(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces `out`, on any error it is removed."""
    out = Path(out)
    check_writable_output(out, overwrite=overwrite)
    parent = out.resolve().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ArxError(f"cannot write into {parent} ({e.strerror}); choose another -o") from e
    try:
        yield tmp
        _normalize_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normalize_modes(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: give the bundle umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)
