"""An early, one-line refusal when a streamed export clearly cannot fit the machine.

Estimated from the config-only model (parameter count, largest tensor) and the bundle dtype,
before anything is read or written: the bundle's bytes against the free disk at the output,
and the export's peak memory against MemAvailable. The peak is the larger of the emission
(the process, plus a few fp32 copies of the largest tensor in flight) and the parity check
(export/parity_run.py: a float32 reference with the checkpoint mapped while it loads, or the
truncated check when the full depth does not fit). The line names an option that would fit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from arx.errors import ArxError
from arx.export.parity_run import GB, PROCESS_BYTES, full_depth_bytes, memory_budget

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
IN_FLIGHT = 3  # fp32 copies of one tensor at once: read, transposed/packed, converted


def available_memory() -> int | None:
    """MemAvailable (Linux), None where /proc/meminfo is not there (then nothing is refused)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate(src, dtype: str, check_parity: bool) -> tuple[int, float]:
    """(bundle bytes, peak resident bytes) of exporting `src` (a streamed source) in dtype."""
    shapes = [p.shape for p in src.module.parameters()]
    params = sum(s.numel() for s in shapes)
    largest = max((s.numel() for s in shapes), default=0)
    bundle = params * DTYPE_BYTES[dtype]
    emit = PROCESS_BYTES + IN_FLIGHT * 4 * largest
    if not check_parity:
        return bundle, emit
    ckpt = src.tensors.nbytes()
    full = full_depth_bytes(ckpt, bundle, params, dtype, "cpu")
    parity = full if full <= memory_budget(ckpt, bundle) and dtype != "bfloat16" else emit
    return bundle, max(emit, parity)


def check_fits(src, output: Path, dtype: str, check_parity: bool) -> None:
    """Raise ArxError naming an option that fits when memory or disk is clearly too small."""
    if not src.streamed:
        return  # the model is loaded already: what it needed, it has
    bundle, peak = estimate(src, dtype, check_parity)
    free_disk = shutil.disk_usage(_existing(output)).free
    if bundle > free_disk:
        raise ArxError(f"the {dtype} bundle needs about {bundle / GB:.1f} GB of disk and "
                       f"{_existing(output)} has {free_disk / GB:.1f} GB free; free space or "
                       f"write it elsewhere (-o){_smaller(src, dtype, check_parity, 'disk')}")
    free = available_memory()
    if free is not None and peak > free:
        raise ArxError(f"exporting in {dtype} needs about {peak / GB:.1f} GB of memory and "
                       f"{free / GB:.1f} GB is available; close other programs"
                       f"{_smaller(src, dtype, check_parity, 'memory', free)}")


def _smaller(src, dtype: str, check_parity: bool, what: str, free: float | None = None) -> str:
    """', or use --dtype fp16 (about N GB)' where a smaller bundle dtype would fit."""
    if dtype != "float32":
        return ""
    bundle, peak = estimate(src, "float16", check_parity)
    need = bundle if what == "disk" else peak
    if what == "memory" and free is not None and need > free:
        return ""
    return f", or use --dtype fp16 (about {need / GB:.1f} GB of {what})"


def _existing(path: Path) -> Path:
    """The nearest folder that exists on the way to `path` (where the bundle will be)."""
    path = Path(path).absolute().parent
    while not path.exists():
        path = path.parent
    return path
