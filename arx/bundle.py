"""Atomic bundle writing: build in a temp folder beside the target, then rename into place.

A failed export, calibration or build leaves nothing half-made: either the complete new
bundle is at the output path, or the path is as it was before.

A killed one (SIGKILL, power loss) cannot clean up, so each temp folder's name carries its
owner, `.NAME.<pid>-<start>-<host>.<random>.tmp` (`.old` for the bundle being replaced): the
next write to NAME removes those whose process is gone (not one a live process is writing) and
says so. The owner is in the name from the moment mkdtemp makes the folder, so no writer is
ever seen unmarked; pid + start time (Linux /proc) tells a reused pid from the original.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import zlib
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
    remove_stale_temp_folders(out)
    prefix = f".{out.name}.{_owner_tag(os.getpid())}."
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    except OSError as e:
        raise ArxError(f"cannot write into {parent} ({e.strerror}); choose another -o") from e
    try:
        yield tmp
        _normalize_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_folders(out: str | Path) -> list[Path]:
    """Remove the temp folders of writes to `out` whose process is gone; print one line."""
    out = Path(out)
    parent = out.resolve().parent
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed, freed = [], 0
    for p in (parent / n for n in sorted(names) if _is_stale(parent, out.name, n)):
        size = _size(p)
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():  # count only what is gone (rmtree skips what it cannot remove)
            removed.append(p)
            freed += size
    if removed:
        print(f"arx: removed {len(removed)} temp folder(s) left by a killed run beside {out.name} "
              f"({', '.join(p.name for p in removed)}), freeing {_human(freed)}",
              file=sys.stderr, flush=True)
    return removed


# what mkdtemp adds between prefix and suffix: letters, digits and "_", never a dot
_TEMP = re.compile(r"(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[0-9a-f]{8})\.[a-z0-9_]+\.(tmp|old)")


def _is_stale(parent: Path, name: str, entry: str) -> bool:
    """Whether `entry` is a temp folder of a write to `name` whose owner process is gone."""
    if not entry.startswith(f".{name}.") or not (parent / entry).is_dir():
        return False
    m = _TEMP.fullmatch(entry[len(name) + 2:])
    # an unmarked folder (an older arx) or another machine's (a shared disk): cannot tell, keep
    if m is None or m["host"] != _host_tag():
        return False
    now = _process_start(int(m["pid"]))
    return now is None or ("0" not in (now, m["start"]) and now != m["start"])  # pid reused


def _owner_tag(pid: int) -> str:
    return f"{pid}-{_process_start(pid) or 0}-{_host_tag()}"


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _process_start(pid: int) -> str | None:
    """The start time of live process `pid` in clock ticks since boot ("0" where it cannot be
    read), None when there is no such process or it is a zombie (killed, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # comm may hold spaces
    except OSError:  # no /proc (macOS), or hidden from us (hidepid): ask whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return "0"
    return None if fields[0] in ("Z", "X") else fields[19]  # state (field 3), starttime (22)


def _size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


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
