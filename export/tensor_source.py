"""Where the exporter reads a checkpoint's tensors from, one tensor at a time.

A TensorSource is dict-like: `name in source`, `source[name]` (or `.get(name)`) -> a float32
numpy array, KeyError for a name it lacks; `transposed(name)` gives a 2-D weight's transpose
in float32 with one copy (the emitter's MatMul weights are (in, out)).
Two kinds behind the same reads (export/weights.py uses only those):

- SafetensorsSource: the *.safetensors files of a Hugging Face folder; a tensor is read and
  upcast only when the emitter asks for it, so a bf16 checkpoint is never upcast as a whole
  and never held twice (docs/design.md, "Streamed export").
- StateDictSource: a module's state dict (model.pt, *.bin folders, checkpoints whose tensor
  names differ from the model's), converted tensor by tensor in the same way.
"""

from __future__ import annotations

import json
import mmap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np

from arx.errors import ArxError
from arx.export.torch_output import error_summary


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly; torch's cast is about 20x numpy's shift
    (0.02 s against 0.39 s for a 2048 x 8192 weight here: 16 s of the 1B fp16 export)."""
    try:
        import torch
    except ImportError:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return into_numpy(bf16_tensor(bits), np.float32)


def contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy (a transposed weight, a column split), by torch where it is there:
    its blocked copy is about 3x numpy's for a transposed 8192 x 2048 float32 weight."""
    if array.flags.c_contiguous:
        return array
    try:
        import torch
    except ImportError:
        return np.ascontiguousarray(array)
    if min(array.strides, default=0) < 0:  # (torch takes no negative strides)
        return np.ascontiguousarray(array)
    return into_numpy(torch.from_numpy(array), array.dtype)


def bf16_tensor(bits: np.ndarray):
    """A torch bfloat16 view of bfloat16 bits held as uint16 (numpy has no bfloat16)."""
    import torch

    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


# Source rows per slab of a transposing copy: a (2048 x 8192) bf16 -> fp32 transpose in slabs
# of 256 took a third of torch's one-call copy_ here (64: the same; 1024: slower than one call)
SLAB_ROWS = 256


def into_numpy(tensor, dtype) -> np.ndarray:
    """`tensor` copied (cast where `dtype` differs) into a new C-contiguous numpy array.

    The array is numpy's, not torch's: numpy asks the kernel for huge pages on big arrays
    (madvise) and torch's allocator does not, and on this machine the page faults of fresh
    memory cost more than the copy itself (docs/design.md, "Streamed export"). A transposed
    2-D view is copied SLAB_ROWS rows of its source at a time, which keeps both sides of each
    slab in cache."""
    import torch

    out = np.empty(tuple(tensor.shape), dtype)
    target = bf16_tensor(out) if dtype == np.uint16 else torch.from_numpy(out)  # bf16 bits
    if tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.shape[1] > SLAB_ROWS:
        for i in range(0, tensor.shape[1], SLAB_ROWS):  # columns here, rows of the source
            target[:, i:i + SLAB_ROWS].copy_(tensor[:, i:i + SLAB_ROWS])
    else:
        target.copy_(tensor)
    return out


def transposed_float32(array: np.ndarray) -> np.ndarray:
    """A 2-D weight as read (float32, float16, or bfloat16 bits as uint16) -> its transpose in
    float32, C-contiguous, widened and transposed in one copy (the emitter's MatMul weights are
    (in, out), checkpoints store (out, in))."""
    try:
        import torch
    except ImportError:
        source = widen_bf16(array) if array.dtype == np.uint16 else array
        return np.ascontiguousarray(source.T, dtype=np.float32)
    source = bf16_tensor(array) if array.dtype == np.uint16 else torch.from_numpy(array)
    return into_numpy(source.t(), np.float32)


def _float32(tensor) -> np.ndarray:
    """One torch tensor -> float32 numpy (bf16 has no numpy dtype: torch upcasts it)."""
    return np.ascontiguousarray(tensor.detach().float().numpy())


class StateDictSource:
    def __init__(self, state: dict):
        self.state = state

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def keys(self) -> Iterable[str]:
        return self.state.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        return _float32(self.state[name])

    def transposed(self, name: str) -> np.ndarray:
        """A 2-D float tensor's transpose as float32, in one copy."""
        return into_numpy(self.state[name].detach().t(), np.float32)

    get = __getitem__


# safetensors dtype codes -> numpy; BF16 is read as its uint16 bits and widened to float32
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


class SafetensorsSource:
    """Every tensor of a folder's *.safetensors shards, by name, read on demand.

    The format is an 8-byte header length, a JSON header (dtype, shape, byte range of each
    tensor), then the bytes; a tensor is converted straight from a mapping of just its bytes,
    closed as soon as the copy is made. Shards are not mapped whole on purpose: pages of a
    mapped file count as the process's resident memory for as long as the mapping lives, so
    mapping every shard (safe_open) would hold the whole checkpoint resident to the end of
    the export.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._where: dict[str, tuple[Path, int, str, tuple]] = {}  # name -> file, offset, ..
        for path in sorted(self.folder.glob("*.safetensors")):
            for name, entry in _header(path).items():
                self._where[name] = entry
        self._check_index()

    def _check_index(self) -> None:
        """A sharded checkpoint's index names every tensor's shard: a missing shard is one
        clear line here, not a missing weight halfway through the export."""
        index = self.folder / "model.safetensors.index.json"
        if not index.is_file():
            return
        try:
            wanted = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArxError(f"{index} is not valid JSON ({e}); re-save the checkpoint") from e
        missing = sorted({f for n, f in wanted.items() if n not in self._where})
        if missing:
            raise ArxError(f"{self.folder} lacks shard(s) {', '.join(missing)} named by "
                           f"{index.name}; the download is incomplete, fetch the missing files")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def dtype(self, name: str) -> str:
        """The safetensors dtype code a tensor is stored in (BF16, F16, F32, ...)."""
        return self._where[name][2]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.first_rows(name, None)

    def first_rows(self, name: str, rows: int | None) -> np.ndarray:
        """The tensor, or only its first `rows` rows along dim 0 (read alone from the file)."""
        with self._mapped(name, rows) as stored:
            if self.dtype(name) == "BF16":  # a float32's top half: widened exactly
                return widen_bf16(stored)
            return np.array(stored, dtype=np.float32 if stored.dtype.kind == "f" else None)

    def transposed(self, name: str, rows: int | None = None) -> np.ndarray:
        """A 2-D float tensor (or its first `rows` rows) transposed, as float32: widened and
        transposed in one copy from the file's pages."""
        code = self.dtype(name)
        if code not in ("BF16", "F16", "F32") or len(self.shape(name)) != 2:
            raise ArxError(f"tensor {name} is {code} {list(self.shape(name))}, not a 2-D float "
                           f"weight; the checkpoint does not match its config's architecture")
        with self._mapped(name, rows) as stored:
            return transposed_float32(stored)

    @contextmanager
    def _mapped(self, name: str, rows: int | None):
        """The tensor's stored values (bfloat16 as uint16 bits), or its first `rows` rows, as
        an array over a private mapping of just its bytes, valid inside the block: the copy
        made from it is the only one (a read into a new array first cost one more, and the
        page faults of that array), and its pages leave the process with the mapping."""
        path, offset, code, shape = self._where[name]
        if rows is not None:
            shape = (min(rows, shape[0]), *shape[1:])
        dtype = np.dtype(_NUMPY[code])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as f:
            try:  # private, so the array is writable (torch takes it) and the file never is
                mapping = mmap.mmap(f.fileno(), offset - start + nbytes, offset=start,
                                    access=mmap.ACCESS_COPY) if nbytes else None
            except ValueError:  # shorter than its header says (changed since it was read)
                raise ArxError(f"{path} ends inside tensor {name}; the weights look corrupt or "
                               f"incomplete, re-download or re-save them") from None
        if mapping is None:
            yield np.empty(shape, dtype)
            return
        try:
            yield np.frombuffer(mapping, dtype, count=nbytes // dtype.itemsize,
                                offset=offset - start).reshape(shape)
        finally:
            try:
                mapping.close()
            except BufferError:  # a view outlived the block (an exception's traceback): the
                pass  # mapping closes when that goes

    get = __getitem__

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in {e[0] for e in self._where.values()})

    def shape(self, name: str) -> tuple:
        return self._where[name][3]


class FirstRows:
    """A SafetensorsSource whose vocabulary tensors (dim 0 the config's vocab_size: embedding,
    LM head and its bias) keep their first `rows` rows, read alone: parity's truncated check
    exports and compares a slice of the vocabulary (export/parity_run.py)."""

    def __init__(self, source: SafetensorsSource, vocab: int, rows: int):
        self.source, self.vocab, self.rows = source, vocab, rows

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def keys(self) -> Iterable[str]:
        return self.source.keys()

    def dtype(self, name: str) -> str:
        return self.source.dtype(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.source.first_rows(name, self._rows(name))

    def transposed(self, name: str) -> np.ndarray:
        return self.source.transposed(name, self._rows(name))

    def _rows(self, name: str) -> int | None:
        shape = self.source.shape(name)
        return self.rows if len(shape) > 0 and shape[0] == self.vocab else None

    get = __getitem__

    def nbytes(self) -> int:
        return self.source.nbytes()


def _header(path: Path) -> dict[str, tuple[Path, int, str, tuple]]:
    """name -> (file, absolute byte offset, dtype code, shape), checked against the file size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file of {size} bytes")
            header = json.loads(f.read(n))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if info["dtype"] not in _NUMPY or 8 + n + end > size:
                raise ValueError(f"tensor {name} ({info['dtype']}) past the end of the file"
                                 if 8 + n + end > size else f"dtype {info['dtype']} of {name}")
            entries[name] = (path, 8 + n + start, info["dtype"], tuple(info["shape"]))
        return entries
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError too
        raise ArxError(f"could not read {path} ({error_summary(e)}); the weights look corrupt "
                       f"or incomplete, re-download or re-save them") from e


def matches_model(source: SafetensorsSource, model) -> bool:
    """Whether the files hold the model's own parameter names (each tied group once), so the
    exporter can read them as they are; checkpoints saved under older layouts (e.g. per-expert
    MoE weights transformers renames and fuses on load) go through the loaded model instead."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return all(any(n in source for n in names) for names in groups.values())
