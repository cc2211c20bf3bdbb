"""--device auto/cuda when onnxruntime lists the CUDA provider but has no usable GPU."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from arx.errors import ArxError
from arx.runtime import backend
from arx.runtime.backend import BackendOptions, OrtBackend


@pytest.fixture
def identity(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)]),
              path)
    return path


@pytest.fixture
def gpu_wheel_without_gpu(monkeypatch):
    """What onnxruntime-gpu does on a machine with no usable GPU: it lists CUDA as available,
    then runs the session on the CPU (the CPU wheel here does the same when asked for CUDA)."""
    monkeypatch.setattr(backend, "resolve_device", lambda device: "cuda")
    warnings.filterwarnings("ignore", message="Specified provider")


def test_auto_follows_the_session_to_the_cpu(identity, gpu_wheel_without_gpu):
    with OrtBackend(identity, options=BackendOptions(device="auto")) as be:
        assert be.device == "cpu"
        buf = be.allocate((2,), "float32")  # a CPU buffer, not a failing CUDA allocation
        assert buf.device_name() == "cpu"
        np.testing.assert_array_equal(be.run({"x": np.ones(2, np.float32)})["y"],
                                      np.ones(2, np.float32))


def test_cuda_without_a_gpu_is_one_line(identity, gpu_wheel_without_gpu):
    with pytest.raises(ArxError, match="no usable CUDA GPU.*--device cpu"):
        OrtBackend(identity, options=BackendOptions(device="cuda"))


def test_low_memory_session_keeps_no_arena_and_no_prepacked_weights(identity):
    """The parity session at export (BackendOptions.low_memory): ORT CPU casts fp16 weights to
    fp32 at every step, and its memory arena would keep those copies (the 1B shape's 2-layer
    fp16 check: 2.15 GB resident after the prefill with it, 0.79 GB without)."""
    with OrtBackend(identity, options=BackendOptions(low_memory=True)) as be:
        so = be.session.get_session_options()
        assert not so.enable_cpu_mem_arena
        assert so.get_session_config_entry("session.disable_prepacking") == "1"
        np.testing.assert_array_equal(be.run({"x": np.ones(2, np.float32)})["y"],
                                      np.ones(2, np.float32))
    with OrtBackend(identity) as be:  # decoding keeps the arena: steps reuse its buffers
        assert be.session.get_session_options().enable_cpu_mem_arena
