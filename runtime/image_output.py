"""Pixels to PNG files: value range to uint8, a grid for a batch, written atomically.

The PNG encoder is the format's minimum (8-bit grayscale or RGB, one zlib stream, no filter)
with zlib and struct, so the edge install needs no imaging library.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from arx.errors import ArxError


def to_uint8(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(B, C, H, W) float in value_range -> (B, H, W, C) uint8, clipped (LlamaGen's decoder
    output is about [-1, 1], not clamped)."""
    lo, hi = value_range
    x = (np.asarray(pixels, np.float32) - lo) / (hi - lo)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images: np.ndarray, gap: int = 1) -> np.ndarray:
    """(B, H, W, C) -> one (rows*H + gaps, cols*W + gaps, C) image, near-square, row-major."""
    b, h, w, c = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = np.zeros((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[r * (h + gap): r * (h + gap) + h, q * (w + gap): q * (w + gap) + w] = img
    return out


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """(H, W, 1|3) uint8 -> PNG file contents; `scale` repeats pixels (nearest) for display."""
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w, c = image.shape
    color = {1: 0, 3: 2}[c]  # PNG colour types: grayscale, RGB

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def check_image_path(path: str | Path) -> Path:
    """Refuse, before any work, a path that cannot be written: a folder, a missing or read-only
    parent folder, or a name that is not .png."""
    path = Path(path)
    if path.is_dir():
        raise ArxError(f"--image {path} is a folder; give a file name such as {path / 'out.png'}")
    if path.suffix.lower() != ".png":
        raise ArxError(f"--image {path} must name a .png file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ArxError(f"cannot write --image {path}: folder {parent} does not exist; create it "
                       f"or choose another path")
    if not os.access(parent, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        raise ArxError(f"cannot write --image {path}: no write permission in {parent}; choose "
                       f"another path")
    return path


def write_png(path: str | Path, image: np.ndarray, scale: int = 1) -> None:
    """Write atomically: a temp file in the same folder renamed into place, so an interrupted
    or failed write leaves no half-written image."""
    path = Path(path)
    data = png_bytes(image, scale)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)  # mkstemp makes 0600; the image gets what open() would give it
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
