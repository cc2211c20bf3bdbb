"""Initializers written to the external data file as they are emitted.

onnx.save_model(save_as_external_data=True) needs every tensor's bytes inside the ModelProto
first: the whole model in memory, then copied out. Here each large initializer goes to
decoder.onnx.data the moment the graph builder adds it, and its TensorProto keeps only the
reference (location, offset, length), so the graph proto never holds weight bytes and a
layer's arrays can be freed as soon as the layer is emitted. Offsets are 4096-aligned, which
lets onnxruntime map the file rather than copy it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ALIGN = 4096
INLINE_BYTES = 1024  # smaller tensors stay in the proto, as save_with_external_data does


def to_proto_array(array: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """(array as stored, TensorProto data type) for a float array in `dtype`; bfloat16 has
    no numpy dtype of its own: stored as its uint16 bits."""
    if array.dtype == np.float32 and dtype in ("float16", "bfloat16"):
        out = _torch_cast(array, dtype)
        if out is not None:
            return out, TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16).view(np.uint16), TensorProto.BFLOAT16
    out = array.astype(dtype, copy=False)
    return out, onnx.helper.np_dtype_to_tensor_dtype(out.dtype)


def _torch_cast(array: np.ndarray, dtype: str) -> np.ndarray | None:
    """float32 -> float16 (or bfloat16 bits) by torch: the same round-to-nearest-even bits as
    numpy's astype (ml_dtypes' for bfloat16), vectorized and threaded where numpy's float16
    cast is a scalar loop: about 1 s per 4096 x 14336 weight here, 15x slower than torch,
    140 s of the 8B fp16 export. None where torch is not installed (the cast is numpy's)."""
    try:
        import torch
    except ImportError:
        return None
    from arx.export.tensor_source import into_numpy

    bits = np.float16 if dtype == "float16" else np.uint16  # (uint16: bfloat16 bits)
    return into_numpy(torch.from_numpy(np.ascontiguousarray(array)), bits)


def tensor_proto(name: str, array: np.ndarray, data_type: int) -> TensorProto:
    """An inline TensorProto of `array` (uint16 bits for bfloat16)."""
    if data_type == TensorProto.BFLOAT16:
        return onnx.helper.make_tensor(name, data_type, array.shape,
                                       np.ascontiguousarray(array).tobytes(), raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


class ExternalDataWriter:
    """Appends tensors to one data file; `location` is its name relative to the .onnx file."""

    def __init__(self, path: Path, location: str):
        self.path, self.location = Path(path), location
        self._file = open(self.path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray, data_type: int,
            dims: list[int] | None = None) -> TensorProto:
        """`array`'s bytes as tensor `name`; `dims`: the logical shape where `array` holds
        packed codes (int4: two a byte), else `array`'s own."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            if dims is not None:
                return onnx.helper.make_tensor(name, data_type, dims, array.tobytes(), raw=True)
            return tensor_proto(name, array, data_type)
        pad = -self.offset % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        self._file.write(memoryview(array.reshape(-1)).cast("B"))  # no bytes copy
        proto = TensorProto(name=name, data_type=data_type,
                            dims=list(array.shape if dims is None else dims),
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ExternalDataWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
