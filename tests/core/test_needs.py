"""Commands and options that need an extra say which one in one line (exit 2) before any work.

Each case runs the real CLI in a subprocess where the optional packages are made unimportable
(`sys.modules[name] = None`, which both `import` and importlib's finder honour), so the dev
environment stands in for an install without that extra. The install itself, without any
extra, is tested in test_install_without_extras.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from arx import needs
from cli_lines import assert_one_line

TENSORRT = ("tensorrt", "tensorrt_bindings", "cuda", "cuda.bindings", "cuda.cudart")


def arx_without(blocked: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess:
    code = (f"import sys\nsys.modules.update(dict.fromkeys({list(blocked)!r}))\n"
            f"from arx.cli import main\nraise SystemExit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_export_without_torch_names_the_export_extra(hf_model_dir, tmp_path):
    folder, _ = hf_model_dir("llama")
    out = tmp_path / "o.arx"
    proc = arx_without(("torch", "transformers"), "export", str(folder), "-o", str(out))
    line = assert_one_line(proc, "arx export", "pip install 'arx[export]'")
    assert "'torch', 'transformers'" in line  # every missing package at once
    assert not out.exists() and not list(tmp_path.iterdir())


def test_profile_plot_without_matplotlib_refuses_before_profiling(exported_bundle, tmp_path):
    png, report = tmp_path / "p.png", tmp_path / "p.json"
    proc = arx_without(("matplotlib",), "profile", str(exported_bundle("llama")), "--prompt-len",
                       "4", "--gen-len", "2", "--runs", "1", "--plot", str(png), "--json", str(report))
    assert_one_line(proc, "arx profile --plot", "'matplotlib'", "pip install 'arx[plot]'")
    assert not png.exists() and not report.exists()


@pytest.mark.parametrize("argv, fragments", [
    (("--scheme", "w8a8"), ("accuracy plot", "'matplotlib'", "arx[calibrate]", "--no-plot")),
])
def test_calibrate_refuses_before_calibrating(exported_bundle, tmp_path, argv, fragments):
    out = tmp_path / "q.arx"
    proc = arx_without(("matplotlib",), "calibrate", str(exported_bundle("llama")),
                       "--random", "--samples", "2", "--eval-samples", "2", "-o", str(out), *argv)
    assert_one_line(proc, *fragments)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_calibrate_w8a8_without_the_plot_needs_no_extra(exported_bundle, tmp_path):
    out = tmp_path / "q.arx"
    proc = arx_without(("matplotlib",), "calibrate", str(exported_bundle("llama")),
                       "--random", "--samples", "4", "--eval-samples", "2", "--seq-len", "8",
                       "--method", "minmax", "--no-plot", "-q", "-o", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "arx.json").is_file()


@pytest.mark.parametrize("command", ["generate", "profile"])
def test_engine_without_tensorrt_names_the_gpu_extra(exported_bundle, command):
    extra = ["--prompt-ids", "1,2"] if command == "generate" else []
    proc = arx_without(TENSORRT, command, str(exported_bundle("llama")), "--engine", "h100", *extra)
    assert_one_line(proc, f"arx {command} --engine", "'tensorrt'", "pip install 'arx[gpu]'")


def test_build_plugin_kernels_need_triton_plugin_free_kits_do_not(exported_bundle, tmp_path):
    bundle = str(exported_bundle("llama"))
    kit = tmp_path / "kit"
    proc = arx_without(("triton", *TENSORRT), "build", bundle, "--target", "orin", "-o", str(kit))
    assert_one_line(proc, "plugin kernels", "pip install 'arx[kernels]'", "--no-plugins")
    assert not kit.exists()
    proc = arx_without(("triton", *TENSORRT), "build", bundle, "--target", "orin", "-o", str(kit),
                       "--no-plugins", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (kit / "kit.json").is_file() and (kit / "decoder.trt.onnx").is_file()


def test_options_that_need_nothing_are_not_checked():
    """The table's conditions: only the options asked for are checked."""
    absent = "arx_test_no_such_module"
    row = needs.Need("profile", (("plot", True),), (absent,), "plot", "arx profile --plot")
    assert needs.applies(row, {"plot": "x.png"}) and not needs.applies(row, {"plot": None})
    scheme = needs.Need("calibrate", (("scheme", ("w8", "w4")),), (absent,), "calibrate", "w")
    assert needs.applies(scheme, {"scheme": "w4"}) and not needs.applies(scheme, {"scheme": "w8a8"})
    assert needs.missing(row) == [absent]
    assert needs.installed(f"{absent}|json") and not needs.installed(f"{absent}.sub")
