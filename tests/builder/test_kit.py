"""Build kits for every family x a few targets; trtexec shapes parsed back and checked against
the manifest; the Python build script compiles; targets table, options and the CLI."""

from __future__ import annotations

import json
import py_compile
import re
import shutil

import pytest

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
    bundle = _copy(exported_bundle, family, tmp_path)
    m = read_manifest(bundle)
    s_max = 24
    result = build_bundle(bundle, BuildOptions(target=target, precision="fp16", kit=True,
                                               max_seq_len=s_max, ptx=False, progress=False))
    kit = result.path
    assert kit == bundle / "kits" / get_target(target).name
    meta = json.loads((kit / "kit.json").read_text())
    for f in meta["files"]:
        assert (kit / f).is_file(), f
    t = get_target(target)
    assert meta["requires"]["tensorrt"] == f">={t.trt_min}"
    assert meta["requires"]["jetpack"] == t.jetpack_min
    assert meta["plugin_sm"] == t.sm
    py_compile.compile(str(kit / "build_engine.py"), doraise=True)
    py_compile.compile(str(kit / "kit_plugins.py"), doraise=True)

    flags = _trtexec_flags((kit / "build_trtexec.sh").read_text())
    lo, opt, hi = (_parse_shapes(flags[k]) for k in ("minShapes", "optShapes", "maxShapes"))
    b = t.max_batch
    for past, present in m.kv.pairs():  # the static cache (B, kv_heads, S_max, D)
        assert lo[past] == (1, m.kv.kv_heads, s_max, m.kv.head_dim)
        assert hi[past] == (b, m.kv.kv_heads, s_max, m.kv.head_dim)
        assert present in meta["kv"]["aliases"] and meta["kv"]["aliases"][present] == past
    assert lo["input_ids"] == (1, 1) and hi["input_ids"] == (b, s_max) and opt["input_ids"][1] == 1
    assert hi["attention_mask"] == (b, s_max)
    assert hi["presence"] == (b, m.vocab_size) and hi["sampling_params"] == (b, 5)
    names = {spec.name for spec in m.decoder.inputs}  # every manifest input has shapes
    assert names <= set(lo)
    prof = {p["name"]: p for p in meta["build"]["profiles"]}
    assert prof["decode"]["shapes"]["input_ids"]["max"] == [b, 1]
    assert prof["prefill"]["shapes"]["input_ids"]["max"] == [b, s_max]
    assert read_manifest(bundle).extensions["builds"][t.name]["kind"] == "kit"


def test_kit_with_ptx_for_orin(exported_bundle, tmp_path):
    """The plugin PTX comes from the plugins' AOT API for the target SM (about 6 s)."""
    pytest.importorskip("triton")
    bundle = _copy(exported_bundle, "qwen3", tmp_path)
    out = tmp_path / "orin-kit"
    build_bundle(bundle, BuildOptions(target="orin", precision="bf16", kit=True, max_seq_len=32,
                                      output=out, progress=False))
    ptx = sorted(p.name for p in (out / "plugins").glob("*.ptx"))
    assert ptx == ["kv_attention_bf16_d32_causal_decode.sm_87.ptx",
                   "kv_attention_bf16_d32_causal_prefill.sm_87.ptx", "sample_fp32.sm_87.ptx"]
    for p in (out / "plugins").glob("*.ptx"):
        assert re.search(r"^\.target\s+sm_87", p.read_text(), re.M)
    with pytest.raises(ArxError, match="already exists"):  # -o folders need --overwrite
        build_bundle(bundle, BuildOptions(target="orin", kit=True, max_seq_len=32, output=out,
                                          ptx=False, progress=False))


def test_portable_kit_uses_sm80_and_compat_flags(exported_bundle, tmp_path):
    bundle = _copy(exported_bundle, "llama", tmp_path)
    kit = build_bundle(bundle, BuildOptions(target="h100", kit=True, portable=True, max_seq_len=32,
                                            ptx=False, progress=False)).path
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
                                      ({"sampler": False, "logits": "none"}, "must return logits")])
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
