"""The calibration cache: `calibration.json` in every quantized bundle.

    {"version": 1, "scheme": "w8a8", "model_fingerprint": sha256 of the fp32 decoder files,
     "method": "minmax", "data": {... what it was calibrated on ...},
     "smoothquant": {"alpha": 0.5, "scales": {"layers.0.attn_norm": [K floats], ...}} | null,
     "ranges": {"layers.0.attn_norm/out": [lo, hi], ...}}

Floats are float32 values written as Python floats, which JSON round-trips exactly: quantizing
from a cache gives bitwise the same model as the run that wrote it. `--calibration-cache FILE`
(or a device build) reuses one without data; it must come from the same fp32 model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from arx.errors import ArxError
from arx.manifest import Manifest

VERSION = 1
FILE_NAME = "calibration.json"


def fingerprint(bundle: Path, manifest: Manifest) -> str:
    """sha256 over the decoder graph and its weights (streamed: models can be GBs)."""
    h = hashlib.sha256()
    base = Path(bundle) / manifest.decoder.file
    for path in (base, base.with_name(base.name + ".data")):
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def read(path: str | Path) -> dict:
    """Load a calibration cache (a calibration.json, or a bundle folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArxError(f"calibration cache {path} does not exist; pass the calibration.json of a "
                       f"w8a8 bundle, or drop --calibration-cache to calibrate from data") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArxError(f"calibration cache {path} is unreadable ({type(e).__name__}); "
                       f"drop --calibration-cache to calibrate again") from None
    if not isinstance(data, dict) or data.get("version") != VERSION or "ranges" not in data:
        raise ArxError(f"{path} is not an arx w8a8 calibration cache (version {VERSION} with ranges); "
                       f"drop --calibration-cache to calibrate again")
    data["_path"] = str(path)
    return data


def check_matches(cache: dict, *, model_fingerprint: str, method: str, alpha: float | None) -> None:
    """A cache is only valid for the same fp32 model and the same range/smoothing settings."""
    where = cache.get("_path", "the calibration cache")
    if cache.get("model_fingerprint") != model_fingerprint:
        raise ArxError(f"{where} was made for another model (fingerprint differs); "
                       f"calibrate this bundle from data instead")
    if cache.get("method") != method:
        raise ArxError(f"{where} holds {cache.get('method')} ranges; pass --method "
                       f"{cache.get('method')} or calibrate from data")
    cached_alpha = (cache.get("smoothquant") or {}).get("alpha")
    if cached_alpha != alpha:
        flag = f"--smoothquant {cached_alpha}" if cached_alpha is not None else "no --smoothquant"
        raise ArxError(f"{where} was made with {flag}; use the same or calibrate from data")


def ranges_for(cache: dict, tensors: list[str]) -> dict[str, list[float]]:
    missing = [t for t in tensors if t not in cache["ranges"]]
    if missing:
        raise ArxError(f"{cache.get('_path')} has no range for {missing[0]} (and {len(missing) - 1} "
                       f"more); calibrate from data for this configuration")
    return {k: [float(v[0]), float(v[1])] for k, v in cache["ranges"].items()}
