"""The package imports without Triton/TensorRT and says what to install when they are missing."""

import subprocess
import sys

import pytest

from arx.errors import ArxError
from arx.plugins._tensorrt import require_trtp, tensorrt_available


def test_import_has_no_heavy_side_effects():
    code = ("import sys, arx.plugins, arx.plugins.tensorrt, arx.plugins.aot; "
            "heavy = [m for m in ('triton', 'torch', 'tensorrt', 'tensorrt_bindings') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_triton_names_the_extra():
    code = ("import sys; sys.modules['triton'] = None\n"
            "try:\n import arx.plugins.attention.triton_kernel\n"
            "except Exception as e: print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "MissingDependency" in out.stdout and "pip install 'arx[kernels]'" in out.stdout


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error():
    with pytest.raises(ArxError, match="TensorRT|arx\\[gpu\\]"):
        require_trtp()


def test_benchmark_fails_clearly_without_cuda():
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_plugins.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    if out.returncode == 0:
        pytest.skip("a CUDA GPU is present: the benchmark ran")
    assert out.returncode == 2 and "CUDA" in out.stderr
