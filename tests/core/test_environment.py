"""`arx inspect --env`: the onnxruntime build and providers arx runs on, the extras installed, and
a second onnxruntime wheel (onnxruntime + onnxruntime-gpu) reported wherever it matters.

A second wheel is made real for the process under test by a dist-info folder on PYTHONPATH:
importlib.metadata then lists onnxruntime-gpu exactly as pip would have left it installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnxruntime
import pytest

from arx.cli import main
from arx.environment import gpu_switch, ort_distributions


def fake_wheel(folder, name="onnxruntime_gpu", version="1.31.1", top_level="onnxruntime"):
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                   f"Version: {version}\n")
    (info / "top_level.txt").write_text(top_level + "\n")
    return folder


def arx(*argv, path=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "arx", *argv], capture_output=True, text=True,
                          env=env, timeout=120)


def test_env_shows_build_providers_and_extras(capsys):
    assert main(["inspect", "--env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    ort = env["onnxruntime"]
    assert ort["version"] == onnxruntime.__version__
    assert ort["build"] == onnxruntime.get_device()
    assert ort["providers"] == onnxruntime.get_available_providers()
    assert ort["distributions"] == [{"name": n, "version": v} for n, v in ort_distributions()]
    assert ort["conflict"] is None  # the dev environment has one onnxruntime wheel
    plot = [r for r in env["extras"] if r["purpose"] == "arx profile --plot"]
    assert plot == [{"command": "profile", "purpose": "arx profile --plot", "extra": "plot",
                     "optional": False, "modules": ["matplotlib"], "missing": []}]
    assert main(["inspect", "--env"]) == 0
    text = capsys.readouterr().out
    assert f"onnxruntime  {onnxruntime.__version__}, {onnxruntime.get_device()} build" in text
    assert "providers    " + ", ".join(onnxruntime.get_available_providers()) in text


def test_env_lists_what_is_missing(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from arx.cli import main; raise SystemExit(main(['inspect', '--env']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if "arx profile --plot" in line]
    assert rows and rows[0][0] == "missing" and rows[0][-2:] == ["arx[plot]", "matplotlib"]


def test_two_onnxruntime_wheels_are_reported(tmp_path):
    both = fake_wheel(tmp_path / "site")
    fake_wheel(both, name="onnxruntime_extensions", version="0.15.2", top_level="onnxruntime_extensions")
    proc = arx("inspect", "--env", "--json", path=both)
    assert proc.returncode == 0, proc.stderr
    ort = json.loads(proc.stdout)["onnxruntime"]
    names = [d["name"] for d in ort["distributions"]]
    assert names == ["onnxruntime", "onnxruntime-gpu"]  # extensions installs another module
    assert "onnxruntime-gpu 1.31.1" in ort["conflict"] and gpu_switch() in ort["conflict"]
    text = arx("inspect", "--env", path=both).stdout
    assert any(line.startswith("warning      ") and "installed together" in line
               for line in text.splitlines())


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="onnxruntime's GPU build is installed: --device cuda is not refused")
def test_device_cuda_says_how_to_get_the_gpu_build(exported_bundle, tmp_path):
    bundle = str(exported_bundle("llama"))
    for path, fragment in ((None, "this onnxruntime is the CPU build"),
                           (fake_wheel(tmp_path / "site"), "installed together")):
        proc = arx("generate", bundle, "--prompt-ids", "1,2", "--device", "cuda", path=path)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        line, = proc.stderr.splitlines()
        assert line.startswith("arx: error: --device cuda") and fragment in line
        assert gpu_switch() in line
    proc = arx("generate", bundle, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--device",
               "auto", path=tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("arx: warning: onnxruntime ") and "installed together" in proc.stderr


def test_inspect_needs_a_bundle_or_env(capsys):
    assert main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("arx: error: arx inspect needs a bundle") and "--env" in err


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="onnxruntime's GPU build is installed: --device cuda is not refused")
def test_backend_refuses_cuda_with_the_same_fix():
    """Library users (DecoderSession without the CLI) get the message the CLI gives."""
    from arx.errors import ArxError
    from arx.runtime.backend import resolve_device

    with pytest.raises(ArxError, match="onnxruntime's GPU build") as e:
        resolve_device("cuda")
    assert gpu_switch() in str(e.value)
    assert resolve_device("cpu") == "cpu"
