"""The Triton kernels run on the CPU through Triton's interpreter in these tests.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's default warning


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def triton():
    return pytest.importorskip("triton")


@pytest.fixture
def fake_trtp():
    """A fresh fake `tensorrt.plugin` (fake_trtp.py) and its fake `tensorrt`: (trt, trtp)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("fake_trtp.py")
    spec = importlib.util.spec_from_file_location("arx_test_fake_trtp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FAKE_TRT, module.FakeTrtp()
