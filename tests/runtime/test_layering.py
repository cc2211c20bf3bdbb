"""The runtime runs where only numpy + onnxruntime (+ tokenizers) exist: no torch, ever."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = """
import builtins, sys
real_import = builtins.__import__
def guarded(name, *a, **k):
    if name.split('.')[0] in ('torch', 'transformers'):
        raise ImportError('blocked: ' + name)
    return real_import(name, *a, **k)
builtins.__import__ = guarded
"""


def test_runtime_generates_without_torch(exported_bundle):
    bundle = exported_bundle("llama")
    code = BLOCK_TORCH + f"""
from arx.cli import main
rc = main(['generate', {str(bundle)!r}, '--prompt-ids', '1,2,3', '--max-new-tokens', '5', '--json'])
assert rc == 0, rc
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'torch leaked'
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"tokens"' in proc.stdout


def test_runtime_modules_import_no_heavy_packages():
    mods = ["arx.runtime.backend", "arx.runtime.decoder", "arx.runtime.generate",
            "arx.runtime.kv_cache", "arx.runtime.sampler", "arx.runtime.tokenizer",
            "arx.runtime.profiler", "arx.runtime.roofline", "arx.runtime.tensorrt_backend",
            "arx.runtime.engine_session", "arx.cli"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + \
        "heavy = [m for m in ('torch', 'transformers', 'tensorrt', 'triton') if m in sys.modules]\n" \
        "assert not heavy, heavy\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_serving_scheduler_imports_no_http_and_no_torch():
    """The continuous-batching scheduler is a loop policy over the runtime, usable without the
    server (Ray Serve, Triton's Python backend, tests): no FastAPI, no torch."""
    code = "import sys\nimport arx.serve.scheduler, arx.serve.metrics, arx.serve.stops\n" \
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'starlette', 'uvicorn', " \
        "'jinja2') if m in sys.modules]\nassert not heavy, heavy\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
