"""Ctrl-C ends every command with `arx: interrupted` and exit 130, even inside an import."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from arx.errors import require
from cli_lines import ARX_AT_A_TERMINAL

# Makes `import onnxruntime` slow and, like onnxruntime's own module init (measured on 1.31: a
# SIGINT while it imports numpy), print the KeyboardInterrupt and raise ImportError instead.
SLOW_ORT = textwrap.dedent("""
    import importlib.machinery, os, sys, time, traceback

    class SlowOnnxruntime:
        def find_spec(self, name, path=None, target=None):
            if name != "onnxruntime":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            real_exec = spec.loader.exec_module

            def exec_module(module):
                open(os.environ["ARX_TEST_IMPORTING"], "w").close()
                try:
                    time.sleep(float(os.environ["ARX_TEST_IMPORT_S"]))
                except KeyboardInterrupt:
                    traceback.print_exc()
                    raise ImportError("import numpy failed") from None
                real_exec(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, SlowOnnxruntime())
""")


def interrupt_while_importing(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_ORT)
    marker = tmp_path / "importing"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "ARX_TEST_IMPORTING": str(marker), "ARX_TEST_IMPORT_S": "2"}
    proc = subprocess.Popen(ARX_AT_A_TERMINAL + argv, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "onnxruntime was never imported"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_ctrl_c_while_generate_imports_onnxruntime(tmp_path, exported_bundle):
    got = interrupt_while_importing(tmp_path, ["generate", str(exported_bundle("llama")),
                                               "--prompt-ids", "1,5,9", "--max-new-tokens", "64"])
    assert got.returncode == 130, got.stderr
    assert got.stderr.strip() == "arx: interrupted", got.stderr
    assert got.stdout == ""  # stopped before generating


def test_require_turns_a_wrapped_interrupt_back_into_one(tmp_path, monkeypatch):
    """pybind11's module init raises ImportError("initialization failed") from a Ctrl-C: that is
    an interrupt, not a missing package to install."""
    (tmp_path / "arx_test_wrapped.py").write_text(
        "raise ImportError('initialization failed') from KeyboardInterrupt()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        require("arx_test_wrapped", "export", "the test")
