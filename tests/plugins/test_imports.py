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


def test_benchmark_parses_cache_pairs_without_cuda():
    """bench_plugins' cache rows: every pair parses on the CPU (the script imports without
    torch or CUDA), a pair the plugin lacks is refused in one line with exit 2."""
    import importlib.util
    from pathlib import Path

    from arx.plugins.trt_contract import CACHE_COMBOS

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_plugins.py"
    spec = importlib.util.spec_from_file_location("bench_plugins_under_test", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.parse_args([]).caches) <= set(CACHE_COMBOS)
    every = ["/".join(c) for c in CACHE_COMBOS]
    assert bench.parse_args(["--caches", *every, "--no-sampling"]).caches == list(CACHE_COMBOS)
    out = subprocess.run([sys.executable, str(script), "--caches", "fp16/fp32"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "fp16/int8" in out.stderr and "CUDA" not in out.stderr
