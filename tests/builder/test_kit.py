"""Build kits for every family x a few targets; trtexec shapes parsed back and checked against
the manifest; the Python build script compiles; targets table, options and the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import NATIVE_ONLY

from arx.builder.build import build_bundle
from arx.builder.options import BuildOptions
from arx.builder.targets import TARGETS, get_target
from arx.errors import ArxError
from arx.manifest import read_manifest

KIT_TARGETS = ("orin", "h100", "thor")


def _copy(exported_bundle, family, tmp_path):
    dst = tmp_path / f"{family}.arx"
    shutil.copytree(exported_bundle(family), dst)
    return dst


def _parse_shapes(arg: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(x) for x in dims.split("x"))
            for name, dims in (part.rsplit(":", 1) for part in arg.split(","))}


def _trtexec_flags(script: str) -> dict[str, str]:
    return dict(re.findall(r"--(\w+)=(\S+)", script))


@pytest.mark.parametrize("target", KIT_TARGETS)
def test_kit_for_every_family(family, target, exported_bundle, tmp_path):
    """The plugin kit and the plugin-free kit (--no-plugins) of every family for each target:
    files, versions, the profiles in kit.json and the shapes of the trtexec script (parsed back
    from the plugin-free kit's script; the plugin kit's script refuses, exit 2)."""
    bundle = _copy(exported_bundle, family, tmp_path)
    m = read_manifest(bundle)
    s_max, t = 24, get_target(target)
    b = t.max_batch
    kits = {}
    for kind, extra in (("plugins", {}), ("native", {"attention": "native", "sampler": "argmax"})):
        options = BuildOptions(target=target, precision="fp16", kit=True, max_seq_len=s_max,
                               ptx=False, progress=False, output=tmp_path / kind, **extra)
        if kind == "plugins" and family in NATIVE_ONLY:  # soft-capped attention: no plugin
            with pytest.raises(ArxError, match="--attention native"):
                build_bundle(bundle, options)
            assert not (tmp_path / kind).exists()
            continue
        kit = kits[kind] = build_bundle(bundle, options).path
        meta = json.loads((kit / "kit.json").read_text())
        for f in meta["files"]:
            assert (kit / f).is_file(), f
        assert meta["requires"]["tensorrt"] == f">={t.trt_min}"
        assert meta["requires"]["jetpack"] == t.jetpack_min
        assert meta["plugin_sm"] == t.sm and meta["build"]["plugins"] == (kind == "plugins")
        assert (kit / "kit_plugins.py").exists() == (kind == "plugins")
        py_compile.compile(str(kit / "build_engine.py"), doraise=True)
        prof = {p["name"]: p for p in meta["build"]["profiles"]}
        assert prof["decode"]["shapes"]["input_ids"]["max"] == [b, 1]
        assert prof["prefill"]["shapes"]["input_ids"]["max"] == [b, s_max]
        for past, present in m.kv.pairs():
            assert meta["kv"]["aliases"][present] == past
    if "plugins" in kits:
        _check_plugin_kit(kits["plugins"], b, m.vocab_size)
    _check_native_kit_shapes(kits["native"], m, b, s_max)


def _check_plugin_kit(kit: Path, b: int, vocab_size: int) -> None:
    py_compile.compile(str(kit / "kit_plugins.py"), doraise=True)
    sampler = json.loads((kit / "kit.json").read_text())["build"]["profiles"][0]["shapes"]
    assert sampler["presence"]["max"] == [b, vocab_size] and sampler["sampling_params"]["max"] == [b, 5]
    refused = subprocess.run(["bash", str(kit / "build_trtexec.sh")], capture_output=True, text=True)
    assert refused.returncode == 2 and "--no-plugins" in refused.stderr


def _check_native_kit_shapes(kit: Path, m, b: int, s_max: int) -> None:
    flags = _trtexec_flags((kit / "build_trtexec.sh").read_text())
    lo, opt, hi = (_parse_shapes(flags[k]) for k in ("minShapes", "optShapes", "maxShapes"))
    for past in (p for p, _ in m.kv.pairs()):  # the static cache (B, kv_heads, S_max, D)
        assert lo[past] == (1, m.kv.kv_heads, s_max, m.kv.head_dim)
        assert hi[past] == (b, m.kv.kv_heads, s_max, m.kv.head_dim)
    assert lo["input_ids"] == (1, 1) and hi["input_ids"] == (b, s_max) and opt["input_ids"][1] == 1
    assert hi["past_lengths"] == (b,) == hi["new_lengths"] and "presence" not in hi
    # every manifest input has shapes, but logits_indices and attention_mask, which the
    # TensorRT form computes or replaces by the per-row lengths
    names = {spec.name for spec in m.decoder.inputs} - {"logits_indices", "attention_mask"}
    assert names <= set(lo)


_PTX_KIT = """
import sys
from pathlib import Path
from arx.builder.build import build_bundle
from arx.builder.options import BuildOptions
build_bundle(Path(sys.argv[1]), BuildOptions(target="orin", precision="bf16", kit=True,
             max_seq_len=32, output=Path(sys.argv[2]), progress=False))
"""


def test_kit_with_ptx_for_orin(exported_bundle, tmp_path, fake_trtp):
    """The plugin PTX comes from the plugins' AOT API for the target SM (about 6 s; in its own
    process: the plugin tests run Triton's interpreter, whose kernels cannot be compiled).
    The kit's kit_plugins.py then launches exactly the kernels that PTX declares."""
    pytest.importorskip("triton")
    bundle = _copy(exported_bundle, "qwen3", tmp_path)
    out = tmp_path / "orin-kit"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _PTX_KIT, str(bundle), str(out)], check=True,
                   env=env, capture_output=True, timeout=600)
    ptx = sorted(p.name for p in (out / "plugins").glob("*.ptx"))
    assert ptx == ["kv_attention_bf16_d32_causal_decode.sm_87.ptx",
                   "kv_attention_bf16_d32_causal_prefill.sm_87.ptx", "sample_fp32.sm_87.ptx"]
    for p in (out / "plugins").glob("*.ptx"):
        assert re.search(r"^\.target\s+sm_87", p.read_text(), re.M)
    _check_kit_launches(out, *fake_trtp)
    with pytest.raises(ArxError, match="already exists"):  # -o folders need --overwrite
        build_bundle(bundle, BuildOptions(target="orin", kit=True, max_seq_len=32, output=out,
                                          ptx=False, progress=False))


def _check_kit_launches(kit, trt, trtp):
    """Register the kit's own kit_plugins.py (fake tensorrt.plugin) and check each AOT launch
    against its PTX entry: 12 pointer parameters, then one .u32 per scalar passed."""
    module = _load_kit_plugins(kit)
    module.register_descriptors(trt, trtp)
    module.register_aot(trtp, module.folder_kernels(str(kit / "plugins")))
    td = trtp.TensorDesc
    descs = [td((2, 3, 4, 32), "BF16"), td((2, 3, 2, 32), "BF16"), td((2, 3, 2, 32), "BF16"),
             td((2, 2, 32, 32), "BF16"), td((2, 2, 32, 32), "BF16"), td((2,), "INT32"),
             td((2,), "INT32"), td((1,), "FLOAT"), td((1,), "FLOAT")]  # scales: placeholders
    for tactic, phase in module.TACTICS.items():
        entry, ptx, _, extra = trtp.plugins["arx::kv_attention"]["aot_impl"](
            *descs, "causal", 0.0, 24, (), tactic)
        head = re.search(r"\.entry " + entry + r"\((.*?)\)", ptx, re.S).group(1)
        assert head.count(".param .u64") == 12  # 9 inputs + 3 outputs
        assert head.count(".param .u32") == len(extra) == 6
        assert extra[4].value == 24  # the window reaches the kernel as a runtime scalar


def _load_kit_plugins(kit):
    spec = importlib.util.spec_from_file_location("kit_plugins_under_test", kit / "kit_plugins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kit_plugins_is_the_contract_verbatim(exported_bundle, tmp_path):
    """One source of truth: kit_plugins.py is plugins/trt_contract.py byte for byte, and
    imports and registers without arx, Triton or torch on the device."""
    from arx.plugins import trt_contract

    bundle = _copy(exported_bundle, "llama", tmp_path)
    kit = build_bundle(bundle, BuildOptions(target="thor", kit=True, max_seq_len=32, ptx=False,
                                            progress=False)).path
    assert (kit / "kit_plugins.py").read_bytes() == Path(trt_contract.__file__).read_bytes()
    code = ("import sys\n"
            "for m in ('arx', 'triton', 'torch', 'numpy'): sys.modules[m] = None\n"
            f"sys.path.insert(0, {str(kit)!r})\n"
            "import kit_plugins\n"
            "print(callable(kit_plugins.register), kit_plugins.sample_tag('fp16', True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.split() == ["True", "sample_fp16_cfg"]


def test_portable_kit_uses_sm80_and_compat_flags(exported_bundle, tmp_path):
    bundle = _copy(exported_bundle, "llama", tmp_path)
    kit = build_bundle(bundle, BuildOptions(target="h100", kit=True, portable=True, max_seq_len=32,
                                            ptx=False, progress=False, attention="native",
                                            sampler="argmax")).path
    meta = json.loads((kit / "kit.json").read_text())
    assert meta["plugin_sm"] == "sm_80" and meta["build"]["portable"]
    assert meta["build"]["hardware_compatibility"] == "AMPERE_PLUS"
    script = (kit / "build_trtexec.sh").read_text()
    assert "--versionCompatible" in script and "--hardwareCompatibilityLevel=ampere+" in script


def test_no_tensorrt_falls_back_to_kit(exported_bundle, tmp_path, capsys):
    from arx.builder.engine import engine_unavailable_reason

    if engine_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are here: an engine would be built")
    bundle = _copy(exported_bundle, "gpt2", tmp_path)
    result = build_bundle(bundle, BuildOptions(target="l4", max_seq_len=32, ptx=False))
    assert result.kind == "kit" and result.note
    assert "writing a build kit" in capsys.readouterr().err


def test_targets_table_and_unknown_target():
    assert get_target("4090").sm == "sm_89" and get_target("H100").sm == "sm_90a"
    assert get_target("orin").jetpack_min and get_target("thor").sm == "sm_110a"
    from arx.plugins.aot import TARGETS as PTX_TARGETS

    assert {t.sm for t in TARGETS.values()} <= set(PTX_TARGETS)  # every SM has a PTX target
    with pytest.raises(ArxError, match="known targets: a100, orin"):
        BuildOptions(target="tpu")


@pytest.mark.parametrize("kw,match", [({"precision": "fp8"}, "unknown precision"),
                                      ({"max_batch": 0}, "max-batch"),
                                      ({"sampler": "none", "logits": "none"}, "must return logits"),
                                      ({"sampler": "topk"}, "--sampler must be one of"),
                                      ({"attention": "flash"}, "--attention must be one of")])
def test_options_validate(kw, match):
    with pytest.raises(ArxError, match=match):
        BuildOptions(target="h100", **kw)


def test_cli_list_targets_and_kit(exported_bundle, tmp_path, capsys):
    from arx.cli import main as _unused  # noqa: F401  (the CLI module imports)
    import argparse

    from arx.commands import build as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["build", "--list-targets"])
    assert args.run(args) == 0 and "sm_87" in capsys.readouterr().out
    bundle = _copy(exported_bundle, "phi3", tmp_path)
    args = parser.parse_args(["build", str(bundle), "--target", "orin", "--kit", "--no-ptx",
                              "--max-seq-len", "32", "--max-batch", "2", "-q"])
    assert args.run(args) == 0
    meta = json.loads((bundle / "kits" / "orin" / "kit.json").read_text())
    assert meta["max_batch"] == 2 and meta["max_seq_len"] == 32
    args = parser.parse_args(["build", str(bundle), "--target", "orin", "--kit", "--no-plugins",
                              "--max-seq-len", "32", "-q"])
    assert args.run(args) == 0
    meta = json.loads((bundle / "kits" / "orin" / "kit.json").read_text())
    assert not meta["build"]["plugins"] and "token_ids" in [t["name"] for t in meta["io"]["outputs"]]
    args = parser.parse_args(["build", str(bundle), "--target", "orin", "--kit", "--no-ptx",
                              "--attention", "native", "--sampler", "none", "-q"])
    assert args.run(args) == 0
    meta = json.loads((bundle / "kits" / "orin" / "kit.json").read_text())
    assert [t["name"] for t in meta["io"]["outputs"]][0] == "last_logits"
