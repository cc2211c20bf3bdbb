"""plugins/trt_contract.py, the TensorRT face shared by arx and the kits, run against a fake
`tensorrt.plugin` (fake_trtp.py): descriptors, aliasing, tactics, AOT launch geometry and
scalars, signature rules, stale-PTX refusal; and the module needs neither arx nor Triton."""

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from arx.plugins import trt_contract as tc


def _meta(tag, scalars, block_m=16):
    return {"entry": f"{tag}_entry", "block": [128, 1, 1], "shared_mem": 4096,
            "constexprs": {"BLOCK_M": block_m}, "scalars": list(scalars)}


def _kit_folder(path, scalars=tc.ATTENTION_SCALARS):
    for phase, block_m in (("decode", 16), ("prefill", 64)):
        tag = tc.attention_tag("fp16", 128, "causal", phase)
        (path / f"{tag}.sm_90a.ptx").write_text(f"// {tag}\n")
        (path / f"{tag}.sm_90a.json").write_text(json.dumps(_meta(tag, scalars, block_m)))
    tag = tc.sample_tag("fp32", False)
    (path / f"{tag}.sm_90a.ptx").write_text(f"// {tag}\n")
    (path / f"{tag}.sm_90a.json").write_text(json.dumps(_meta(tag, tc.SAMPLE_SCALARS)))
    return str(path)


def _attention_descs(trtp, b=2, s=5, hq=8, hkv=2, s_max=300, d=128, dtype="HALF", cache=None):
    td = trtp.TensorDesc
    cache = cache or dtype
    return (td((b, s, hq, d), dtype), td((b, s, hkv, d), dtype), td((b, s, hkv, d), dtype),
            td((b, hkv, s_max, d), cache), td((b, hkv, s_max, d), cache), td((b,), "INT32"),
            td((b,), "INT32"), td((hkv, 1, d), "FLOAT"), td((hkv, 1, d), "FLOAT"))


def test_module_needs_neither_arx_nor_triton():
    code = ("import sys, importlib.util\n"
            "for m in ('arx', 'triton', 'torch', 'numpy', 'tensorrt', 'tensorrt_bindings'):\n"
            "    sys.modules[m] = None\n"
            f"spec = importlib.util.spec_from_file_location('kit_plugins', {tc.__file__!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(m.attention_tag('fp16', 64, 'block', 'decode'), m.qk_scale_bits(0.0, 64))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["kv_attention_fp16_d64_block_decode",
                                  str(tc.qk_scale_bits(0.125, 64))]


@pytest.mark.parametrize("scale,d", [(0.0, 64), (0.0, 80), (0.3, 128), (1.0, 32)])
def test_qk_scale_bits_are_fp32_scale_times_log2e(scale, d):
    bits = tc.qk_scale_bits(scale, d)
    value = struct.unpack("<f", struct.pack("<i", bits))[0]
    want = np.float32((scale or 1 / math.sqrt(d)) * math.log2(math.e))
    assert value == want and 0 < bits < 2**31


def test_descriptors_alias_the_cache_and_list_tactics(fake_trtp):
    trt, trtp = fake_trtp
    tc.register_descriptors(trt, trtp)
    tc.register_descriptors(trt, trtp)  # idempotent: the second call registers nothing
    p = trtp.plugins[tc.KV_ATTENTION]
    assert p["tensors"] == ["q", "k_new", "v_new", "k_cache", "v_cache", "past_len", "new_len",
                            "k_scale", "v_scale"]
    assert p["attrs"] == ["mask", "scale", "window"]
    descs = _attention_descs(trtp)
    out, k_out, v_out = p["describe"](*descs, "causal", 0.0, 0)
    assert out.shape_expr == descs[0].shape_expr and not out.alias
    assert k_out.alias and v_out.alias and k_out.shape_expr == descs[3].shape_expr
    combos = p["autotune"](*descs, "causal", 0.0, 0, ())
    assert combos[0].tactics == list(tc.TACTICS) == [1, 2]
    assert combos[0].types.count(",") == 11  # 9 inputs + 3 outputs
    sample = trtp.plugins[tc.SAMPLE]
    assert sample["tensors"] == ["logits", "params", "presence", "seed", "offset", "row"]
    descs = (trtp.TensorDesc((3, 100), "FLOAT"), trtp.TensorDesc((3, 5), "FLOAT"),
             *(trtp.TensorDesc((3,), "INT64") for _ in range(3)))
    ids = sample["describe"](descs[0], descs[1], None, *descs[2:], 0)
    assert ids[0].shape_expr == (3,)
    types = [t.strip() for t in sample["autotune"](descs[0], descs[1], None, *descs[2:], 0,
                                                   ())[0].types.split(",")]
    assert types[3:] == ["INT64"] * 3 + ["INT32"]  # seed, offset, row; ids


@pytest.mark.parametrize("tactic,phase,block_m", [(1, "decode", 16), (2, "prefill", 64)])
def test_aot_launch_from_kit_folder(fake_trtp, tmp_path, tactic, phase, block_m):
    trt, trtp = fake_trtp
    tc.register_descriptors(trt, trtp)
    tc.register_aot(trtp, tc.folder_kernels(_kit_folder(tmp_path)))
    descs = _attention_descs(trtp, b=2, s=5, hq=8, hkv=2, s_max=300)
    entry, ptx, params, extra = trtp.plugins[tc.KV_ATTENTION]["aot_impl"](
        *descs, "causal", 0.3, 24, (), tactic)
    assert entry == f"kv_attention_fp16_d128_causal_{phase}_entry" and phase in ptx
    assert (params.grid_x, params.grid_y) == (math.ceil(5 * 4 / block_m), 2 * 2)
    assert (params.block_x, params.shared_mem) == (128, 4096)
    # S_NEW, S_MAX, HQ, HKV, WINDOW, QK_SCALE: scale and window are runtime scalars
    assert [e.value for e in extra] == [5, 300, 8, 2, 24, tc.qk_scale_bits(0.3, 128)]
    assert all(isinstance(e, trtp.SymInt32) for e in extra)
    logits, params_in = trtp.TensorDesc((3, 1000), "FLOAT"), trtp.TensorDesc((3, 5), "FLOAT")
    entry, _, launch, extra = trtp.plugins[tc.SAMPLE]["aot_impl"](logits, params_in, None, None,
                                                                  None, None, 0, (), 0)
    assert entry == "sample_fp32_entry" and launch.grid_x == 3
    assert [e.value for e in extra] == [3, 1000]


def test_aot_refuses_stale_or_missing_ptx(fake_trtp, tmp_path):
    trt, trtp = fake_trtp
    tc.register_descriptors(trt, trtp)
    old = _kit_folder(tmp_path, scalars=("S_NEW", "S_MAX", "HQ", "HKV"))
    tc.register_aot(trtp, tc.folder_kernels(old))
    aot = trtp.plugins[tc.KV_ATTENTION]["aot_impl"]
    with pytest.raises(ValueError, match="recompile the PTX"):
        aot(*_attention_descs(trtp), "causal", 0.0, 0, (), 1)
    with pytest.raises(KeyError, match="no PTX for kv_attention_fp16_d128_block_decode"):
        aot(*_attention_descs(trtp), "block", 0.0, 0, (), 1)
    with pytest.raises(FileNotFoundError):
        tc.folder_kernels(str(tmp_path / "empty"))


def test_aot_refuses_a_sampler_ptx_without_the_row_input(fake_trtp):
    """A sampler PTX compiled before the row input has the same scalars, one pointer fewer."""
    trt, trtp = fake_trtp
    tc.register_descriptors(trt, trtp)
    old = {"LOGITS": "*fp32", "PARAMS": "*fp32", "PRESENCE": "*i1", "SEED": "*i64",
           "OFFSET": "*i64", "B": "i32", "V": "i32", "IDS": "*i32"}

    def kernel(tag, spec, signature=old):
        return "entry", "// ptx", dict(_meta(tag, tc.SAMPLE_SCALARS), signature=signature)

    descs = (trtp.TensorDesc((3, 1000), "FLOAT"), trtp.TensorDesc((3, 5), "FLOAT"))
    tc.register_aot(trtp, kernel)
    with pytest.raises(ValueError, match="no row input.*recompile the PTX"):
        trtp.plugins[tc.SAMPLE]["aot_impl"](*descs, None, None, None, None, 0, (), 0)
    tc.register_aot(trtp, lambda tag, spec: kernel(tag, spec, {**old, "ROW": "*i64"}))
    assert trtp.plugins[tc.SAMPLE]["aot_impl"](*descs, None, None, None, None, 0, (), 0)[0] \
        == "entry"


def test_register_plugins_in_arx(fake_trtp, monkeypatch):
    """arx's registration: the shared descriptors + JIT impls + compiling AOT source, with
    signatures TensorRT accepts (the fake applies tensorrt.plugin's rule)."""
    import arx.plugins._tensorrt as trt_access
    from arx.plugins.tensorrt import PLUGIN_IDS, register_plugins

    trt, trtp = fake_trtp
    monkeypatch.setattr(trt_access, "require_trtp", lambda: trtp)
    monkeypatch.setattr(trt_access, "require_tensorrt", lambda: trt)
    assert register_plugins("sm_90a") == register_plugins("sm_90a") == PLUGIN_IDS
    for pid in PLUGIN_IDS:
        assert {"describe", "autotune", "impl", "aot_impl"} <= set(trtp.plugins[pid])


def _trt_combinations(io_types: str) -> list:
    """tensorrt.plugin 11.4's own expansion of an io_types string (_gen_onesided_combinations,
    taken from the installed bindings' source: importing them needs the TensorRT libraries)."""
    import ast
    import builtins
    import copy
    from pathlib import Path

    spec = pytest.importorskip("importlib.util").find_spec("tensorrt_bindings")
    if spec is None:
        pytest.skip("tensorrt_bindings not installed")
    path = Path(spec.origin).parent / "plugin" / "_autotune.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if getattr(n, "name", "") == "_gen_onesided_combinations")
    scope = {"builtins": builtins, "copy": copy}
    exec(compile(ast.Module([fn], []), str(path), "exec"), scope)
    return scope["_gen_onesided_combinations"]([t.strip() for t in io_types.split(",")])


def test_autotune_types_are_the_cache_combos():
    """What TensorRT expands kv_attention's io_types to: one combination per CACHE_COMBOS row,
    activations/cache/int32/fp32-scale positions as the contract says."""
    names = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16", "INT8": "int8"}
    combos = _trt_combinations(tc.attention_types())
    got = {(names[c[0]], names[c[3]]) for c in combos}
    assert got == set(tc.CACHE_COMBOS) and len(combos) == len(tc.CACHE_COMBOS)
    for c in combos:
        assert c[0:3] == [c[0]] * 3 and c[9] == c[0]  # q, k_new, v_new, out
        assert c[3:5] == [c[3]] * 2 and c[10:12] == [c[3]] * 2  # caches in and out
        assert c[5:7] == ["INT32"] * 2 and c[7:9] == ["FP32"] * 2


@pytest.mark.parametrize("dtype,cache,tag", [
    ("HALF", "INT8", "kv_attention_fp16_kvint8_d128_causal_decode"),
    ("FLOAT", "HALF", "kv_attention_fp32_kvfp16_d128_causal_decode"),
    ("BF16", "BF16", "kv_attention_bf16_d128_causal_decode")])
def test_aot_launch_names_the_cache_variant(fake_trtp, dtype, cache, tag):
    """The AOT impl asks its kernel source for the variant of the cache's dtype (the tag of a
    cache in the activations' dtype is the one kits had before int8 caches)."""
    trt, trtp = fake_trtp
    tc.register_descriptors(trt, trtp)
    asked = []

    def kernel(t, spec):
        asked.append((t, spec))
        return "entry", "// ptx", _meta(t, tc.ATTENTION_SCALARS)

    tc.register_aot(trtp, kernel)
    aot = trtp.plugins[tc.KV_ATTENTION]["aot_impl"]
    aot(*_attention_descs(trtp, dtype=dtype, cache=cache), "causal", 0.0, 0, (), 1)
    assert asked[0][0] == tag and asked[0][1]["cache"] == tc.CACHE_DTYPES[cache]
    with pytest.raises(ValueError, match="not fp32"):  # fp16 engine, fp32 cache: no variant
        aot(*_attention_descs(trtp, dtype="HALF", cache="FLOAT"), "causal", 0.0, 0, (), 1)
