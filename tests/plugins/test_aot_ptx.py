"""AOT PTX for every target, compiled here without a GPU (Triton's LLVM + bundled ptxas)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from arx.plugins.aot import TARGETS, ptx_target_line, strip_scratch_params
from arx.plugins.trt_contract import ATTENTION_SCALARS, SAMPLE_SCALARS

EXPECTED_SM = {"sm_80": "sm_80", "sm_87": "sm_87", "sm_89": "sm_89", "sm_90a": "sm_90a",
               "sm_110a": "sm_110a"}


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compile_ptx.py"
TAGS = ["kv_attention_fp16_d128_causal_decode", "kv_attention_fp16_kvint8_d128_causal_decode",
        "sample_bf16_cfg"]


@pytest.fixture(scope="module")
def compiled(triton, tmp_path_factory):
    """One attention and one sampler variant for every target, through the script (its own
    process: this one runs the kernels in the interpreter, which cannot compile them)."""
    from arx.plugins.aot import default_variants

    out = tmp_path_factory.mktemp("ptx")
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    for tag in TAGS:
        cmd += ["--variant", tag]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out, TAGS, {tag: src for tag, src in default_variants() if tag in TAGS}


def test_target_table_covers_the_issue():
    assert set(TARGETS) == set(EXPECTED_SM)
    assert {t.arch for t in TARGETS.values()} == {80, 87, 89, 90, 110}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_ptx_for_every_target(compiled, target):
    out, tags, sources = compiled
    for tag in tags:
        ptx = (out / f"{tag}.{target}.ptx").read_text()
        meta = json.loads((out / f"{tag}.{target}.json").read_text())
        assert ptx_target_line(ptx) == EXPECTED_SM[target]
        assert re.search(r"^\.version \d+\.\d+", ptx, re.M)
        entry = re.search(r"\.visible \.entry (\w+)\((.*?)\)", ptx, re.S)
        assert entry and entry.group(1) == meta["entry"]
        # exactly TensorRT's arguments: inputs, int32 scalars, outputs (scratch params removed)
        assert entry.group(2).count(".param") == len(sources[tag]["signature"])
        assert meta["target"] == target and meta["block"][0] == 32 * meta["num_warps"]
        assert meta["signature"] == sources[tag]["signature"] and meta["shared_mem"] >= 0
        # the scalars are trt_contract's, all int32 (TensorRT's AOT launch passes no other)
        scalars = ATTENTION_SCALARS if tag.startswith("kv_attention") else SAMPLE_SCALARS
        assert meta["scalars"] == list(scalars)
        assert [meta["signature"][n] for n in scalars] == ["i32"] * len(scalars)
        assert "SCALE" not in meta["constexprs"]  # scale is a runtime scalar: one PTX for all
        if "kvint8" in tag:  # int8 codes in and out, the per-channel scales as fp32 inputs
            sig = meta["signature"]
            assert [sig[n] for n in ("K_CACHE", "V_CACHE", "K_OUT", "V_OUT")] == ["*i8"] * 4
            assert [sig[n] for n in ("K_SCALE", "V_SCALE")] == ["*fp32"] * 2


def test_one_attention_ptx_serves_every_scale_and_window():
    """The variant tag names only what the PTX is compiled for (no scale, no window)."""
    from arx.plugins.attention.triton_kernel import AttentionVariant

    v = AttentionVariant(dtype="fp16", head_dim=128, mask="causal", phase="decode")
    assert v.tag == "kv_attention_fp16_d128_causal_decode"
    assert not {"scale", "window"} & set(AttentionVariant.__dataclass_fields__)


def test_stripped_ptx_assembles(compiled, triton):
    """The PTX that TensorRT gets (without the scratch parameters) is accepted by ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    out, tags, _ = compiled
    for target in ("sm_87", "sm_90a"):
        ptxas = get_ptxas(TARGETS[target].arch).path
        for tag in tags:
            src = out / f"{tag}.{target}.ptx"
            subprocess.run([ptxas, f"--gpu-name={target}", str(src), "-o",
                            str(src.with_suffix(".cubin"))], check=True, capture_output=True)


def test_strip_refuses_used_params():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n"
           "\tld.param.b64 %rd1, [k_param_1];\n}\n")
    with pytest.raises(ValueError, match="scratch"):
        strip_scratch_params(ptx, "k", 1)
    assert "k_param_1" not in strip_scratch_params(ptx.replace("[k_param_1]", "[k_param_0]"),
                                                   "k", 1)


def test_fp16_cache_variants_compile(triton):
    """The pairs kits compile on demand (an fp16 cache under fp32 and bf16 activations, the
    latter's dots in fp32) assemble for the oldest and an arch-specific target."""
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from arx.plugins.aot import compile_source, ptx_target_line\n"
            "from arx.plugins.attention.triton_kernel import AttentionVariant, aot_source\n"
            "for dtype in ('fp32', 'bf16'):\n"
            "    v = AttentionVariant(dtype=dtype, head_dim=64, mask='block', phase='prefill',"
            " cache='fp16')\n"
            "    for target in ('sm_80', 'sm_90a'):\n"
            "        c = compile_source(aot_source(v), target, v.tag)\n"
            "        print(v.tag, ptx_target_line(c.ptx), c.meta['signature']['K_CACHE'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split("\n")
    assert out[:4] == [f"kv_attention_{d}_kvfp16_d64_block_prefill {sm} *fp16"
                       for d in ("fp32", "bf16") for sm in ("sm_80", "sm_90a")]
