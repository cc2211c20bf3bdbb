"""TensorRT backend: the same interface as OrtBackend (context manager, allocate, run).

    engine (engines/<target>/decoder.engine) + build_report.json (IO, profiles, aliases)
        │
    run(feeds): host arrays ─H2D─► fixed staging buffers (allocated once at the profile max,
                                   so addresses never change and a CUDA graph stays valid)
                device buffers (allocate(): the KV cache) are bound as they are
                present.i.* outputs ─► bound to the address of past_key_values.i.* (in place)
                other outputs (token_ids, last_logits) ─► device buffers ─D2H─► numpy
    decode steps (the decode profile, same shapes and addresses as the step before) are
    captured once into a CUDA graph and replayed: one launch per token.

TensorRT and CUDA are imported only here, lazily; `trt` and `cuda` can be injected (the tests
pass fakes that record every binding). CUDA is reached through cuda-python (`cuda.bindings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from arx.errors import ArxError, require

_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "INT8": np.int8, "UINT8": np.uint8}


def numpy_dtype(trt_dtype) -> np.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in _NP:
        raise ArxError(f"engine tensor type {name} has no numpy type in the arx runtime")
    return np.dtype(_NP[name])


@dataclass(frozen=True)
class TensorRTOptions:
    device: int = 0
    cuda_graphs: bool = True  # capture decode steps into a CUDA graph and replay it


@dataclass
class DeviceBuffer:
    """Device memory the backend owns; bound as input and (aliased) output."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


class CudaRuntime:
    """The few CUDA runtime calls the backend needs (cuda-python), behind one small class."""

    def __init__(self, device: int = 0):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            cudart = require("cuda.cudart", "gpu", "The TensorRT backend")
        self.rt = cudart
        self._check(cudart.cudaSetDevice(device))

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise ArxError(f"CUDA call failed ({err}); check the GPU and driver")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._check(self.rt.cudaMalloc(max(nbytes, 1))))
        self._check(self.rt.cudaMemset(ptr, 0, max(nbytes, 1)))
        return ptr

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr))

    def stream(self) -> int:
        return int(self._check(self.rt.cudaStreamCreate()))

    def h2d(self, ptr: int, array: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream))

    def d2h(self, array: np.ndarray, ptr: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream))

    def synchronize(self, stream: int) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def capture_begin(self, stream: int) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.rt.cudaStreamBeginCapture(stream, mode))

    def capture_end(self, stream: int) -> Any:
        graph = self._check(self.rt.cudaStreamEndCapture(stream))
        return self._check(self.rt.cudaGraphInstantiate(graph, 0))

    def graph_launch(self, graph_exec, stream: int) -> None:
        self._check(self.rt.cudaGraphLaunch(graph_exec, stream))


def load_build_report(bundle_dir: str | Path, build: Mapping[str, Any]) -> tuple[Path, dict]:
    """(engine path, build report) of the engine the manifest's `builds[target]` entry names
    (runtime.engine_session.engine_build checks the entry)."""
    folder = Path(bundle_dir) / build["path"]
    report = json.loads((folder / "build_report.json").read_text(encoding="utf-8"))
    return folder / "decoder.engine", report


class TensorRTBackend:
    """A deserialized engine with one execution context; `aliases` maps output -> input."""

    def __init__(self, engine_path: str | Path, report: Mapping[str, Any], *,
                 aliases: Mapping[str, str] | None = None,
                 options: TensorRTOptions = TensorRTOptions(), trt=None, cuda=None):
        if trt is None:
            from arx.plugins._tensorrt import require_tensorrt

            trt = require_tensorrt()
        self.trt, self.options = trt, options
        self.cuda = cuda or CudaRuntime(options.device)
        self.report = dict(report)
        self.aliases = dict(aliases if aliases is not None else report.get("aliases", {}))
        self.profiles = [p for p in report["plan"]["profiles"]]
        self._load(Path(engine_path))
        self.stream = self.cuda.stream()
        self._staging: dict[str, DeviceBuffer] = {}
        self._outputs: dict[str, DeviceBuffer] = {}
        self._profile: int | None = None
        self._graph: tuple[Any, Any] | None = None  # (key, graph exec)
        self._seen: Any = None
        self._host_refs: list[np.ndarray] = []  # host arrays of async copies, kept until sync

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise ArxError(f"engine {path} does not exist; build it with arx build")
        trt = self.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArxError(f"TensorRT could not load {path} (built by another TensorRT version or "
                           f"for another GPU?); rebuild it with arx build on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        expected = {t["name"] for t in (*self.report["io"]["inputs"], *self.report["io"]["outputs"])}
        if set(names) != expected:
            raise ArxError(f"engine {path} IO {sorted(names)} does not match its build report; "
                           f"rebuild it with arx build")
        self.dtypes = {n: numpy_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for buf in (*self._staging.values(), *self._outputs.values()):
            self.cuda.free(buf.ptr)
        self._staging, self._outputs, self._graph = {}, {}, None
        self.context = None

    def allocate(self, shape: tuple[int, ...], dtype: str) -> DeviceBuffer:
        """A zeroed device buffer (the KV cache): bound as input and as its aliased output."""
        dt = np.dtype(dtype) if dtype != "bfloat16" else numpy_dtype("BF16")
        nbytes = int(np.prod(shape)) * dt.itemsize
        return DeviceBuffer(self.cuda.malloc(nbytes), tuple(shape), dt, nbytes)

    def release(self, buf: DeviceBuffer) -> None:
        """Free a buffer `allocate` made (a generation's cache, at its end)."""
        self.cuda.free(buf.ptr)

    # ------------------------------------------------------------------ binding
    def _choose_profile(self, feeds: Mapping[str, Any]) -> int:
        """Decode when every input fits the decode profile, else prefill (index in the plan)."""
        for i in sorted(range(len(self.profiles)), key=lambda i: self.profiles[i]["name"] != "decode"):
            shapes = self.profiles[i]["shapes"]
            if all(all(lo <= d <= hi for d, lo, hi in zip(_shape(v), shapes[n]["min"], shapes[n]["max"]))
                   for n, v in feeds.items() if n in shapes):
                return i
        raise ArxError("input shapes fit no optimization profile of the engine (batch or "
                       "sequence beyond --max-batch/--max-seq-len of the build)")

    def _stage(self, name: str, value: np.ndarray) -> DeviceBuffer:
        """Copy a host input into its fixed staging buffer (sized for every profile's max)."""
        buf = self._staging.get(name)
        if buf is None:
            worst = max((p["shapes"][name]["max"] for p in self.profiles), key=lambda s: np.prod(s))
            buf = self.allocate(tuple(worst), str(self.dtypes[name]))
            self._staging[name] = buf
        value = np.ascontiguousarray(value, dtype=self.dtypes[name])
        self._host_refs.append(value)
        self.cuda.h2d(buf.ptr, value, self.stream)
        return buf

    def _bind(self, feeds: Mapping[str, Any]) -> list[str]:
        """Set shapes and addresses of every IO tensor; return the outputs to copy back."""
        profile = self._choose_profile(feeds)
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self.stream)
            self._profile, self._graph = profile, None
        for name in self.input_names:
            if name not in feeds:
                raise ArxError(f"missing engine input {name}")
            value = feeds[name]
            buf = value if isinstance(value, DeviceBuffer) else self._stage(name, value)
            self.context.set_input_shape(name, _shape(value))
            self.context.set_tensor_address(name, buf.ptr)
        returned = []
        for name in self.output_names:
            src = self.aliases.get(name)
            if src is not None:  # the plugin writes the cache in place: same address
                self.context.set_tensor_address(name, feeds[src].ptr)
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            buf = self._outputs.get(name)
            if buf is None or buf.shape != shape:
                if buf is not None:
                    self.cuda.free(buf.ptr)
                buf = self._outputs[name] = self.allocate(shape, str(self.dtypes[name]))
                self._graph = None  # an address changed: a captured graph is stale
            self.context.set_tensor_address(name, buf.ptr)
            returned.append(name)
        return returned

    def _execute(self, key) -> None:
        """Run once; on a decode step whose key repeats, capture a CUDA graph, then replay it."""
        decode = self.profiles[self._profile]["name"] == "decode"
        if not (self.options.cuda_graphs and decode):
            self._enqueue()
            return
        if self._graph is not None and self._graph[0] == key:
            self.cuda.graph_launch(self._graph[1], self.stream)
            return
        if self._seen != key:  # first step with these shapes: let TensorRT settle, no capture
            self._seen = key
            self._enqueue()
            return
        self.cuda.capture_begin(self.stream)
        self._enqueue()
        self._graph = (key, self.cuda.capture_end(self.stream))
        self.cuda.graph_launch(self._graph[1], self.stream)

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise ArxError("TensorRT failed to run the engine (see its log)")

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        returned = self._bind(feeds)
        key = tuple((n, _shape(feeds[n]), getattr(feeds[n], "ptr", None)) for n in self.input_names)
        self._execute(key)
        out = {}
        for name in returned:
            buf = self._outputs[name]
            host = np.empty(buf.shape, buf.dtype)
            self.cuda.d2h(host, buf.ptr, self.stream)
            out[name] = host
        self.cuda.synchronize(self.stream)
        self._host_refs.clear()
        return out


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape)
