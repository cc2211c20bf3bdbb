"""`arx calibrate --kv-dtype fp16|int8`: the calibrated bundle gets a smaller KV cache.

    fp32 source ─► int8 scales: absmax/127 per layer, kv head and channel of the cache the
                   calibration samples leave (export/kv_dtype.py) ─► the output bundle's
                   attention rewritten for that cache
    and, for the report, the fp32-weight source with only its cache converted (the graphs
    copied, the weights' data file linked), evaluated against the fp32 cache on the same
    held-out text: what the cache alone costs, beside what weights + cache cost (the gate).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from arx.calibration.data import Samples
from arx.export import kv_dtype as kv
from arx.manifest import MANIFEST_NAME, Manifest, read_manifest


def cache_scales(src: Path, dtype: str, samples: Samples) -> dict[str, np.ndarray] | None:
    return kv.measure_scales(src, samples.calib) if dtype == "int8" else None


def quantize_cache(tmp: Path, manifest: Manifest, dtype: str, scales, samples: Samples) -> Manifest:
    """Rewrite the output bundle in `tmp` for a `dtype` cache; return its manifest."""
    source = {"kind": samples.source.get("kind"), "path": samples.source.get("path"),
              "samples": len(samples.calib)} if scales is not None else None
    return kv.record(kv.convert_bundle(tmp, manifest, dtype, scales), source)


def cache_only_metrics(src: Path, dtype: str, scales, samples: Samples, work: Path):
    """ModelMetrics of the fp32-weight bundle with only its cache in `dtype`, vs fp32."""
    from arx.calibration.evaluate import model_metrics

    copy = Path(work) / "kv-only.arx"
    copy.mkdir()
    manifest = read_manifest(src)
    for f in sorted(Path(src).iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".data":  # weights: read, never written, so a hard link will do
            _link_or_copy(f, copy / f.name)  # (ORT refuses a symlink out of the folder)
        elif f.name != MANIFEST_NAME:
            shutil.copy2(f, copy / f.name)
    kv.convert_bundle(copy, manifest, dtype, scales).write(copy)
    return model_metrics(src, copy, samples.eval, progress=False)


def with_cache(trial, bundle: Path, dtype: str, scales):
    """A remedies trial (calibration/remedies.py) for the output bundle's cache: each candidate
    decoder (an fp32-cache graph) gets the same cache rewrite before it is measured."""
    import onnx

    layout = read_manifest(bundle).kv  # only its names are read: the same for every dtype

    def run(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        kv.retype_decoder(copy, layout, dtype, scales)
        return trial(copy)

    return run


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)
