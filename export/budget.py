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


def estimate(src, dtype: str, check_parity: bool, quantize=None) -> tuple[int, float]:
    """(bundle bytes, peak resident bytes) of exporting `src` (a streamed source) in dtype, or
    --quantize'd (`quantize`: its CalibrateOptions, or a scheme name: calibrate's defaults)."""
    shapes = [p.shape for p in src.module.parameters()]
    params = sum(s.numel() for s in shapes)
    largest = max((s.numel() for s in shapes), default=0)
    bundle = params * DTYPE_BYTES[dtype]
    emit = PROCESS_BYTES + IN_FLIGHT * 4 * largest
    ckpt = src.tensors.nbytes()
    if quantize is not None:
        return _quantized(src, quantize, params, emit, ckpt, largest)
    if not check_parity:
        return bundle, emit
    full = full_depth_bytes(ckpt, bundle, params, dtype, "cpu")
    parity = full if full <= memory_budget(ckpt, bundle) and dtype != "bfloat16" else \
        truncated_bytes(src)
    return bundle, max(emit, parity)


def truncated_bytes(src) -> float:
    """Peak of parity's check on the first TRUNCATED_LAYERS layers, exported in float32 from the
    same files (parity_run.truncated_parity): the float32 reference of those layers and the
    embedding and head, beside the part of the checkpoint it reads (the export itself reads
    the first TRUNCATED_VOCAB rows of those; the reference loads them whole, then cuts them)."""
    from arx.export.parity_run import TRUNCATED_LAYERS, checkpoint_dtype

    layers = getattr(src.module.config, "num_hidden_layers", 0) or 1
    in_layers = sum(p.numel() for n, p in src.module.named_parameters() if ".layers." in n)
    outside = sum(p.numel() for p in src.module.parameters()) - in_layers
    kept = outside + in_layers * min(TRUNCATED_LAYERS, layers) / layers
    return PROCESS_BYTES + kept * (4 + DTYPE_BYTES.get(checkpoint_dtype(src), 4))


def _quantized(src, quantize, params: int, emit: float, ckpt: int, largest: int
               ) -> tuple[int, float]:
    """A --quantize export: its bundle (export/quantized_export.quantized_bytes), and a peak of
    the emission or the accuracy check's reference (the model in the checkpoint's dtype, loaded
    while the checkpoint is mapped; computing in float32 it also holds a float32 copy of the
    weight in use, the head the largest: export/float32_compute.py) and then the quantized
    bundle's session."""
    from arx.calibration.options import QuantOptions
    from arx.export.float32_compute import native_half
    from arx.export.parity_run import checkpoint_dtype
    from arx.export.quantized_export import quantized_bytes

    quant = QuantOptions(scheme=quantize) if isinstance(quantize, str) else quantize.quant
    embed = src.module.get_input_embeddings().weight.numel()
    # an int4 table of its own at w4 (a tied one reads the head's codes: counted twice, on the
    # safe side); w8's untied table stays float32
    bundle = quantized_bytes(params, embed, quant.spec.weight_bits, quant.group_size,
                             quant.embedding and quant.spec.weight_bits == 4)
    dtype = checkpoint_dtype(src)
    check = full_depth_bytes(ckpt, bundle, params, dtype, "cpu")
    if dtype != "float32" and not native_half(dtype):
        check += 4 * largest
    return bundle, max(emit, check, truncated_bytes(src))  # + the emitter's float check


def check_fits(src, output: Path, dtype: str, check_parity: bool, quantize=None) -> None:
    """Raise ArxError naming an option that fits when memory or disk is clearly too small."""
    if not src.streamed:
        return  # the model is loaded already: what it needed, it has
    if src.num_layers is not None:
        return  # parity's truncated export: the whole export's estimate counted it
    bundle, peak = estimate(src, dtype, check_parity, quantize)
    what = f"--quantize {quantize.quant.scheme}" if quantize is not None else dtype
    free_disk = shutil.disk_usage(_existing(output)).free
    if bundle > free_disk:
        raise ArxError(f"the {what} bundle needs about {bundle / GB:.1f} GB of disk and "
                       f"{_existing(output)} has {free_disk / GB:.1f} GB free; free space or "
                       f"write it elsewhere (-o)"
                       f"{_smaller(src, dtype, check_parity, 'disk', quantize, free_disk)}")
    free = available_memory()
    if free is not None and peak > free:
        raise ArxError(f"exporting {'as' if quantize is not None else 'in'} {what} needs about "
                       f"{peak / GB:.1f} GB of memory and {free / GB:.1f} GB is available; close "
                       f"other programs{_smaller(src, dtype, check_parity, 'memory', quantize, free)}")


def _smaller(src, dtype: str, check_parity: bool, what: str, quantize=None,
             free: float | None = None) -> str:
    """', or use --dtype fp16 (about N GB)' where a smaller bundle would fit: fp16, else w4."""
    if quantize is not None and quantize.quant.scheme == "w4":
        return ""
    options = [] if quantize is not None else [("--dtype fp16", "float16", None)] \
        if dtype == "float32" else []
    for flag, d, q in options + [("--quantize w4", "float32", "w4")]:
        bundle, peak = estimate(src, d, check_parity, q)
        need = bundle if what == "disk" else peak
        if free is None or need <= free:
            return f", or use {flag} (about {need / GB:.1f} GB of {what})"
    return ""


def _existing(path: Path) -> Path:
    """The nearest folder that exists on the way to `path` (where the bundle will be)."""
    path = Path(path).absolute().parent
    while not path.exists():
        path = path.parent
    return path
