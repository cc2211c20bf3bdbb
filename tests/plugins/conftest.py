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
