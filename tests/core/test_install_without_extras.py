"""`pip install arx` without extras (what an edge device gets) in a fresh virtual environment:
generate and profile run on a bundle, and every command that needs an extra names it in one
line before doing any work.

The venv has no system site packages and gets this checkout's sources with plain `pip install`
(not -e), so a requirement missing from pyproject.toml fails here. pip resolves the base
requirements from the package index (CI reaches PyPI; a warm wheel cache makes it ~20 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from arx.cli import main
from cli_lines import assert_one_line

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "arx-tiny"
# pip builds a source folder in place (build/, *.egg-info): it builds a copy, so the checkout
# stays untouched and concurrent runs do not share a build folder.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "models", "__pycache__", "*.egg-info",
                                     "build", "dist", ".pytest_cache", "*.arx")


@pytest.fixture(scope="module")
def base_install(tmp_path_factory):
    """The `arx` executable of a fresh venv holding arx and its base requirements only."""
    tmp = tmp_path_factory.mktemp("base-install")
    shutil.copytree(ROOT, tmp / "src", ignore=NOT_SOURCES)
    venv.create(tmp / "venv", with_pip=True, system_site_packages=False)
    python = tmp / "venv" / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(tmp / "src")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "venv" / "bin" / "arx"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The default model exported with this (dev) environment's arx."""
    out = tmp_path_factory.mktemp("base-bundle") / "tiny.arx"
    assert main(["export", str(TINY), "-o", str(out), "-q"]) == 0
    return out


def run(arx: Path, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(arx), *argv], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_no_extra_is_installed(base_install):
    proc = run(base_install, "inspect", "--env", "--json")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["onnxruntime"]["distributions"] == [{"name": "onnxruntime",
                                                    "version": env["onnxruntime"]["version"]}]
    missing = {r["purpose"]: r["missing"] for r in env["extras"]}
    assert missing["arx export"] == ["torch", "transformers", "safetensors", "onnxscript"]
    assert missing["arx profile --plot"] == ["matplotlib"]


def test_generate_matches_the_full_install(base_install, bundle, capsys):
    argv = ["generate", str(bundle), "--prompt", "Once upon a time", "--max-new-tokens", "12",
            "--greedy", "--json"]
    proc = run(base_install, *argv)
    assert proc.returncode == 0, proc.stderr
    assert main(argv) == 0
    full = json.loads(capsys.readouterr().out)
    assert json.loads(proc.stdout)["sequences"] == full["sequences"]


def test_profile_runs(base_install, bundle, tmp_path):
    report = tmp_path / "p.json"
    proc = run(base_install, "profile", str(bundle), "--prompt-len", "8", "--gen-len", "4",
               "--runs", "1", "--warmup", "0", "--no-roofline", "--quiet", "--json", str(report))
    assert proc.returncode == 0, proc.stderr
    row, = json.loads(report.read_text())["bundles"][0]["results"]
    assert row["prompt_len"] == 8 and row["ttft_ms"] > 0 and row["tokens_per_s"] > 0
    assert row["op_breakdown"]["decode"]  # ORT's own profiler works in the base install


def test_plugin_free_kit_and_w8a8_calibration_need_no_extra(base_install, bundle, tmp_path):
    kit = tmp_path / "kit"
    proc = run(base_install, "build", str(bundle), "--target", "orin", "--no-plugins", "-o",
               str(kit), "-q")
    assert proc.returncode == 0, proc.stderr
    assert (kit / "kit.json").is_file()
    out = tmp_path / "q.arx"
    proc = run(base_install, "calibrate", str(bundle), "--data", str(TINY / "calib.txt"),
               "--samples", "4", "--eval-samples", "2", "--seq-len", "16", "--method", "minmax",
               "--no-plot", "-q", "--force", "-o", str(out))  # the gate is tested elsewhere
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "arx.json").read_text())["quantization"]["scheme"] == "w8a8"


@pytest.mark.parametrize("argv, extra", [
    (("export", str(TINY), "-o", "{tmp}/out.arx"), "export"),
    (("calibrate", "{bundle}", "--random", "-o", "{tmp}/out.arx"), "calibrate"),
    (("profile", "{bundle}", "--plot", "{tmp}/out.png"), "plot"),
    (("generate", "{bundle}", "--prompt", "Hi", "--engine", "h100"), "gpu"),
    (("profile", "{bundle}", "--engine", "h100"), "gpu"),
    (("build", "{bundle}", "--target", "orin", "-o", "{tmp}/out"), "kernels"),
], ids=["export", "calibrate", "profile-plot", "generate-engine",
        "profile-engine", "build-plugins"])
def test_commands_needing_an_extra_name_it(base_install, bundle, tmp_path, argv, extra):
    argv = [a.format(tmp=tmp_path, bundle=bundle) for a in argv]
    proc = run(base_install, *argv, cwd=tmp_path)
    assert_one_line(proc, f"pip install 'arx[{extra}]'")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp folder
