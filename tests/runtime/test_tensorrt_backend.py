"""TensorRT backend: binding logic with fake `tensorrt` and CUDA modules (runs everywhere), and
the real engine round trip (marked tensorrt + gpu: skipped where they are absent)."""

from __future__ import annotations

import enum
import types

import numpy as np
import pytest

from arx.errors import ArxError
from arx.runtime.tensorrt_backend import DeviceBuffer, TensorRTBackend, TensorRTOptions

L, HKV, S_MAX, D, V = 2, 2, 16, 8, 32
PASTS = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
PRESENTS = [p.replace("past_key_values", "present") for p in PASTS]


def _report() -> dict:
    """What builder/engine.py records: IO (from the manifest via the TensorRT form), plan, aliases."""
    cache = ["batch_size", HKV, S_MAX, D]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
              {"name": "past_lengths", "dtype": "int64", "shape": ["batch_size"]},
              {"name": "new_lengths", "dtype": "int64", "shape": ["batch_size"]},
              *({"name": p, "dtype": "float16", "shape": cache} for p in PASTS)]
    outputs = [{"name": "token_ids", "dtype": "int32", "shape": ["batch_size"]},
               *({"name": p, "dtype": "float16", "shape": cache} for p in PRESENTS)]

    def shapes(s_lo, s_hi):
        out = {"input_ids": ([1, s_lo], [2, s_lo], [4, s_hi]),
               "past_lengths": ([1], [2], [4]), "new_lengths": ([1], [2], [4])}
        out.update({p: ([1, HKV, S_MAX, D], [2, HKV, S_MAX, D], [4, HKV, S_MAX, D]) for p in PASTS})
        return {k: {"min": a, "opt": b, "max": c} for k, (a, b, c) in out.items()}

    plan = {"profiles": [{"name": "prefill", "shapes": shapes(1, S_MAX)},
                         {"name": "decode", "shapes": shapes(1, 1)}]}
    return {"io": {"inputs": inputs, "outputs": outputs}, "plan": plan,
            "aliases": dict(zip(PRESENTS, PASTS))}


class FakeCuda:
    """Device memory as host bytearrays keyed by fake pointers; counts graph work."""

    def __init__(self):
        self.mem, self.next, self.captures, self.launches = {}, 4096, 0, 0

    def malloc(self, nbytes):
        self.next += 4096 + nbytes
        self.mem[self.next] = bytearray(nbytes)
        return self.next

    def free(self, ptr):
        self.mem.pop(ptr)

    def stream(self):
        return 7

    def h2d(self, ptr, array, stream):
        self.mem[ptr][:array.nbytes] = array.tobytes()

    def d2h(self, array, ptr, stream):
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.mem[ptr], np.uint8)[:array.nbytes]

    def synchronize(self, stream):
        pass

    def capture_begin(self, stream):
        self.capturing = True

    def capture_end(self, stream):
        self.capturing, self.captures = False, self.captures + 1
        return "graph"

    def graph_launch(self, graph, stream):
        self.launches += 1


class Mode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class DType(enum.Enum):
    INT64 = 0
    INT32 = 1
    HALF = 2


class FakeContext:
    """An execution context that checks the binding contract as a real engine would."""

    def __init__(self, cuda: FakeCuda):
        self.cuda = cuda
        self.shapes, self.addresses, self.profile, self.runs = {}, {}, None, 0

    def set_optimization_profile_async(self, index, stream):
        self.profile = index

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        return (self.shapes["input_ids"][0],)  # token_ids (B,)

    def execute_async_v3(self, stream):
        mem = self.cuda.mem
        self.runs += 1
        ids = np.frombuffer(mem[self.addresses["input_ids"]], np.int64)
        b, s = self.shapes["input_ids"]
        last = ids[: b * s].reshape(b, s)[:, -1].astype(np.int32)
        mem[self.addresses["token_ids"]][: last.nbytes] = last.tobytes()
        # the plugin writes the new keys into the buffer bound to present.0.key
        key = np.frombuffer(mem[self.addresses["present.0.key"]], np.float16)
        mem[self.addresses["present.0.key"]][:] = (key + 1).tobytes()
        return True


class FakeEngine:
    """A deserialized engine whose IO is the build report's."""

    _DTYPES = {"int64": DType.INT64, "int32": DType.INT32, "float16": DType.HALF}

    def __init__(self, cuda: FakeCuda, report: dict):
        self.cuda = cuda
        self.io = {t["name"]: t for t in (*report["io"]["inputs"], *report["io"]["outputs"])}
        self.inputs = {t["name"] for t in report["io"]["inputs"]}
        self.names = list(self.io)
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return Mode.INPUT if name in self.inputs else Mode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._DTYPES[self.io[name]["dtype"]]

    def create_execution_context(self):
        self.context = FakeContext(self.cuda)
        return self.context


def fake_trt(cuda: FakeCuda, report: dict):
    """A `tensorrt` stand-in: Runtime deserializes any bytes into a FakeEngine of `report`."""

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(cuda, report)

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(Runtime=Runtime, Logger=Logger, TensorIOMode=Mode)


@pytest.fixture
def backend(tmp_path):
    engine = tmp_path / "decoder.engine"
    engine.write_bytes(b"plan")
    cuda = FakeCuda()
    report = _report()
    with TensorRTBackend(engine, report, trt=fake_trt(cuda, report), cuda=cuda) as be:
        yield be, cuda


def _feeds(be, batch, s, caches):
    ids = np.arange(batch * s, dtype=np.int64).reshape(batch, s) + 3
    lengths = np.full(batch, s, np.int64)
    return {"input_ids": ids, "past_lengths": np.zeros(batch, np.int64), "new_lengths": lengths,
            **caches}


def test_binding_aliases_cache_and_returns_token_ids(backend):
    be, cuda = backend
    caches = {p: be.allocate((2, HKV, S_MAX, D), "float16") for p in PASTS}
    out = be.run(_feeds(be, 2, 5, caches))
    ctx = be.context
    assert set(out) == {"token_ids"}  # the cache is not copied back
    np.testing.assert_array_equal(out["token_ids"], [7, 12])
    for past, present in zip(PASTS, PRESENTS):  # in place: output bound to the input's memory
        assert ctx.addresses[present] == ctx.addresses[past] == caches[past].ptr
        assert ctx.shapes[past] == (2, HKV, S_MAX, D)
    assert ctx.shapes["input_ids"] == (2, 5) and ctx.profile == 0  # prefill profile
    key = np.frombuffer(cuda.mem[caches[PASTS[0]].ptr], np.float16)
    assert np.all(key == 1)  # written through the aliased output


def test_decode_steps_use_decode_profile_and_cuda_graph(backend):
    be, cuda = backend
    caches = {p: be.allocate((2, HKV, S_MAX, D), "float16") for p in PASTS}
    be.run(_feeds(be, 2, 4, caches))  # prefill
    staging = dict(be._staging)
    for step in range(4):
        out = be.run(_feeds(be, 2, 1, caches))
        assert be.context.profile == 1
    # step 1 runs plainly, step 2 captures (runs inside the capture) and launches, 3-4 replay
    assert cuda.captures == 1 and cuda.launches == 3
    assert be.context.runs == 1 + 2  # prefill + plain decode + the captured enqueue
    assert {k: v.ptr for k, v in be._staging.items()} == {k: v.ptr for k, v in staging.items()}
    assert out["token_ids"].dtype == np.int32


def test_no_cuda_graph_option(tmp_path):
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"plan")
    cuda, report = FakeCuda(), _report()
    be = TensorRTBackend(engine, report, trt=fake_trt(cuda, report), cuda=cuda,
                         options=TensorRTOptions(cuda_graphs=False))
    caches = {p: be.allocate((1, HKV, S_MAX, D), "float16") for p in PASTS}
    for _ in range(3):
        be.run(_feeds(be, 1, 1, caches))
    assert cuda.captures == 0 and be.context.runs == 3


def test_shapes_beyond_profiles_fail_clearly(backend):
    be, _ = backend
    caches = {p: be.allocate((8, HKV, S_MAX, D), "float16") for p in PASTS}
    with pytest.raises(ArxError, match="optimization profile"):
        be.run(_feeds(be, 8, 1, caches))


def test_engine_io_must_match_report(tmp_path):
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"plan")
    cuda, report = FakeCuda(), _report()
    trt = fake_trt(cuda, report)
    report = {**report, "io": {"inputs": report["io"]["inputs"][:1], "outputs": []}}
    with pytest.raises(ArxError, match="does not match its build report"):
        TensorRTBackend(engine, report, trt=trt, cuda=cuda)


def test_allocate_is_a_device_buffer(backend):
    be, cuda = backend
    buf = be.allocate((1, 2, 3), "float16")
    assert isinstance(buf, DeviceBuffer) and buf.nbytes == 12 and buf.ptr in cuda.mem


def test_cuda_calls_are_accepted_by_cuda_python():
    """The real cuda-python (dev extra) without a GPU: every CudaRuntime call gets through the
    binding's argument checks and fails only at the driver, as one clean ArxError."""
    pytest.importorskip("cuda.bindings.runtime")
    from arx.builder.engine import cuda_device_count
    from arx.runtime.tensorrt_backend import CudaRuntime

    if cuda_device_count():
        pytest.skip("a GPU is here: these calls would act; the gpu tests cover them")
    from cuda.bindings import runtime as cudart

    cuda = CudaRuntime.__new__(CudaRuntime)
    cuda.rt = cudart
    host = np.zeros(4, np.float32)
    calls = {"malloc": (16,), "free": (0,), "stream": (), "h2d": (0, host, 0), "d2h": (host, 0, 0),
             "synchronize": (0,), "capture_begin": (0,), "capture_end": (0,),
             "graph_launch": (None, 0)}
    for name, args in calls.items():
        with pytest.raises(ArxError, match="CUDA call failed"):
            getattr(cuda, name)(*args)
    with pytest.raises(ArxError, match="check the GPU and driver"):
        CudaRuntime(0)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("form", [{}, {"attention": "native", "sampler": "argmax"}])
def test_real_engine_matches_ort(exported_bundle, tmp_path, form):
    """Build an fp32 engine of the tiny llama (plugin and plugin-free forms) and compare 16
    greedy tokens of a ragged batch with `arx generate` on the ORT bundle."""
    from arx.builder.build import build_bundle
    from arx.builder.engine import engine_unavailable_reason
    from arx.builder.options import BuildOptions
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.engine_session import open_engine
    from arx.runtime.generate import GenerateOptions, generate

    reason = engine_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import shutil

    bundle = tmp_path / "llama.arx"
    shutil.copytree(exported_bundle("llama"), bundle)
    build_bundle(bundle, BuildOptions(target="h100", precision="fp32", max_seq_len=32,
                                      max_batch=2, progress=False, **form))
    prompts, options = [[1, 17, 33, 5, 9], [1, 64]], GenerateOptions(16, stop_on_eos=False)
    with DecoderSession(bundle) as session:
        want = generate(session, prompts, options).tokens
    with open_engine(bundle, "h100") as session:
        got = generate(session, prompts, options)
    assert got.tokens == want
