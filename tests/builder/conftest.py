"""Fixtures of the builder tests: the ORT runner of TensorRT-form graphs (ort_plugins.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ort_session():
    """ort_session(model) -> an InferenceSession with the arx plugin ops as Python ops."""
    pytest.importorskip("onnxruntime_extensions")
    path = Path(__file__).with_name("ort_plugins.py")
    spec = importlib.util.spec_from_file_location("arx_test_ort_plugins", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ort_session


@pytest.fixture
def fake_trtp():
    """A fresh fake `tensorrt.plugin` (tests/plugins/fake_trtp.py) and fake `tensorrt`."""
    path = Path(__file__).parents[1] / "plugins" / "fake_trtp.py"
    spec = importlib.util.spec_from_file_location("arx_test_fake_trtp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FAKE_TRT, module.FakeTrtp()
