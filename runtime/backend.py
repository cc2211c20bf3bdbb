"""Backends run one stage graph: a context manager with `run(feeds) -> outputs`.

In-place KV: the backend is told which outputs alias which inputs (`present.i.key` ->
`past_key_values.i.key`, from the manifest). It binds such an output to the very buffer fed
as the input, so the attention op writes new keys/values into the preallocated cache and
nothing is copied or returned for them. Other outputs come back as numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from arx.errors import ArxError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class BackendOptions:
    device: str = "cpu"  # "cpu" | "cuda" | "auto" (cuda when onnxruntime-gpu sees a GPU)
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    # Spinning idle threads cut latency on dedicated cores, but when other processes share
    # them it costs (a one-off measurement under load: docs/benchmarks.md, proposal 2).
    spin_wait: bool = True
    enable_profiling: bool = False
    profile_prefix: str = "arx_ort_profile"
    # Parity at export: no prepacked copies of the weights, no constant-folded fp32 copies of
    # fp16 ones (ORT CPU casts fp16 MatMul weights), and no memory arena: the casts' fp32
    # outputs, made at every step, go back when the step ends instead of staying in the arena
    # (a 2-layer fp16 check of the 1B shape: 2.15 GB resident after its prefill with the arena,
    # 0.79 without). So a session holds little beyond the mapped data file (docs/design.md,
    # "Streamed export"). Slower steps; few are run there.
    low_memory: bool = False
    # Prepacked weights: MLAS copies each float MatMul weight into its GEMM layout at load. That
    # speeds every call of 2+ rows (2.5x for the 134M model's 2-8-row steps) and a one-row
    # decode step by 7-20%, and costs the open (1B fp32: 12-13 s against 0.05) and a packed
    # copy (+1 GB resident). False: skip it
    # (`arx generate` of one prompt on a float bundle; benchmarks/bench_prepack.py measures it,
    # docs/design.md "Prepacking at load").
    prepack: bool = True

    def __post_init__(self):
        if self.device not in ("cpu", "cuda", "auto"):
            raise ArxError(f"unknown device {self.device!r}; use cpu, cuda or auto")
        if self.intra_op_threads < 0:
            raise ArxError(f"--threads must be >= 0 (got {self.intra_op_threads}); 0 means one per core")


def resolve_device(device: str) -> str:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if device == "cuda" and PROVIDERS["cuda"] not in available:
        from arx.environment import check_device

        check_device(device)  # raises, naming how to get onnxruntime's GPU build
    return device


class OrtBackend:
    """onnxruntime session with IO binding; `aliases` maps output name -> input name."""

    def __init__(self, onnx_path: str | Path, *, aliases: Mapping[str, str] | None = None,
                 options: BackendOptions = BackendOptions()):
        import onnxruntime as ort

        self.device = resolve_device(options.device)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
        if not options.spin_wait:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if options.low_memory or not options.prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if options.low_memory:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.enable_cpu_mem_arena = False
        if options.enable_profiling:
            so.enable_profiling = True
            so.profile_file_prefix = options.profile_prefix
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), so, providers=[PROVIDERS[self.device]])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArxError(f"onnxruntime could not load {onnx_path} ({str(e).splitlines()[0]}); "
                           f"re-export the bundle") from e
        self._check_provider(options.device)
        self._host: dict[int, tuple[Any, np.ndarray]] = {}  # id -> (buffer, its CPU memory)
        # the last released cache's buffers, by (shape, dtype), for the next cache of that shape
        self._free: dict[tuple, list[tuple[Any, np.ndarray]]] = {}
        self.aliases = dict(aliases or {})
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._ort = ort

    def _check_provider(self, asked: str) -> None:
        """onnxruntime-gpu lists the CUDA provider on a machine without a usable GPU, then
        quietly runs the session on the CPU: follow it for --device auto, refuse --device cuda
        (device buffers on a CPU session would fail later, mid-generation)."""
        if self.device != "cuda" or PROVIDERS["cuda"] in self.session.get_providers():
            return
        if asked == "auto":
            self.device = "cpu"
            return
        raise ArxError("--device cuda: onnxruntime-gpu found no usable CUDA GPU (driver or CUDA "
                       "libraries missing); use --device cpu, or check `arx inspect --env`")

    def __enter__(self) -> "OrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> str | None:
        """Release the session; returns the profile file path when profiling was on."""
        path = None
        if getattr(self, "session", None) is not None and self.session.get_session_options().enable_profiling:
            path = self.session.end_profiling()
        # the binding holds the session too: both go, so its weights are released now
        self.session = self._binding = self._held = None
        self._free = {}
        return path

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A device buffer the backend can bind as input and output: zeroed where it is new;
        on the CPU one the last released cache left, where its shape is the same, with what
        that cache held (a cache reads no entry past each row's length). Fresh memory's page
        faults were most of a first step that touches the whole buffer: GroupQueryAttention's
        over a new 16-row, 680-entry VAR cache took 0.76-0.89 s, 0.03 s over a reused one."""
        if self.device == "cpu":
            key = (tuple(shape), np.dtype(dtype).str)
            if key not in self._free:
                self._free = {}  # another shape: what was kept goes before this is allocated
            pooled = self._free.get(key)
            if pooled:
                value, host = pooled.pop(0)  # in release order: the same binding fits
                self._host[id(value)] = (value, host)
                return value
            host = np.zeros(shape, dtype=dtype)
            value = self._ort.OrtValue.ortvalue_from_numpy(host)
            self._host[id(value)] = (value, host)  # its memory, for row views
            return value
        if dtype == "bfloat16":  # no numpy dtype: allocated by ONNX type (unread until written)
            from onnx import TensorProto

            return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, TensorProto.BFLOAT16,
                                                                   "cuda", 0)
        return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), "cuda", 0)

    def rows(self, buffer: Any, start: int, stop: int) -> Any | None:
        """Rows start:stop of a buffer `allocate` made, as a buffer of their own over the same
        memory (a (B, ...) cache buffer's rows are contiguous), or None where there is no host
        view (CUDA)."""
        held = self._host.get(id(buffer))
        if held is None or held[0] is not buffer:
            return None
        return self._ort.OrtValue.ortvalue_from_numpy(held[1][start:stop])

    def release(self, buffer: Any) -> None:
        """The buffer is no longer used: a CPU one is kept for the next cache of its shape (the
        buffers of one released shape are kept, others dropped), a device one goes with its
        last reference."""
        held = self._host.pop(id(buffer), None)
        if held is None or held[0] is not buffer or getattr(self, "session", None) is None:
            return
        key = (held[1].shape, held[1].dtype.str)
        if key not in self._free:
            self._free = {key: []}
        self._free[key].append(held)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        io = self._binding_for(feeds)
        for name, value in feeds.items():  # per-step host inputs (ids, mask, indices)
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, value)
        for name in self._returned:  # re-bound each run: their shapes change between steps
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        return {name: value.numpy() for name, value in zip(self._returned, self._outputs(io))}

    def _outputs(self, io) -> list:
        """The returned outputs' values, in _returned's order. IOBinding.get_outputs() wraps
        every output in a Python OrtValue, the 2 x layers cache aliases included, each step
        (0.068 ms for a 12-layer model's 25 outputs, 0.004 ms indexed: 0.7% of its 9 ms w4
        decode step, more for small drafts); its vector (the pinned onnxruntime's
        `_iobinding`) is indexed for the few returned ones instead, the public call kept as
        the fallback."""
        vector = getattr(io, "_iobinding", None)
        if vector is None:
            values = dict(zip(self.output_names, io.get_outputs()))
            return [values[n] for n in self._returned]
        outputs = vector.get_outputs()
        return [outputs[i] for i in self._returned_at]

    def _binding_for(self, feeds: Mapping[str, Any]):
        """The IO binding with the device buffers (the KV cache) bound, made once per set of
        buffers: a decode step then rebinds only its few host inputs, not 2 x layers tensors.
        Buffers are compared by identity while the binding holds them, so a new cache (even
        one reusing freed memory) always gets a new binding."""
        buffers = [(n, v) for n, v in feeds.items() if not isinstance(v, np.ndarray)]
        held = getattr(self, "_held", None)
        if held is not None and len(held) == len(buffers) and all(
                a == c and b is d for (a, b), (c, d) in zip(held, buffers)):
            return self._binding
        io = self.session.io_binding()
        for name, value in buffers:
            io.bind_ortvalue_input(name, value)
        self._returned = []
        for name in self.output_names:  # bound in output order: get_outputs() follows it
            src = self.aliases.get(name)
            if src is not None:
                io.bind_ortvalue_output(name, feeds[src])
            else:
                io.bind_output(name, "cpu")
                self._returned.append(name)
        self._returned_at = [self.output_names.index(n) for n in self._returned]
        self._binding, self._held = io, buffers
        return io


def open_stage(bundle_dir: str | Path, manifest, name: str,
               options: BackendOptions = BackendOptions()) -> OrtBackend:
    """An ONNX Runtime session of the bundle's stage `name` (one line if its file is gone)."""
    stage = manifest.stages[name]
    path = Path(bundle_dir) / stage.file
    if not path.is_file():
        raise ArxError(f"bundle {bundle_dir} lacks {stage.file}; re-export it")
    return OrtBackend(path, options=options)
