"""TensorRT forms of a --kv-dtype cache, run on ONNX Runtime against the bundle's own graph."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from form_runs import form_for, ragged_steps, run_form, run_reference

from arx.builder.build import build_bundle
from arx.builder.options import BuildOptions
from arx.errors import ArxError
from arx.export.kv_dtype import convert_export
from arx.manifest import read_manifest

NATIVE = {"attention": "native", "sampler": "argmax"}


@pytest.fixture(scope="module")
def kv_bundle(exported_bundle, tmp_path_factory):
    made = {}

    def get(flag: str):
        if flag not in made:
            out = tmp_path_factory.mktemp(f"kv-{flag}") / "llama.arx"
            shutil.copytree(exported_bundle("llama"), out)
            convert_export(out, read_manifest(out), flag).write(out)
            made[flag] = out
        return made[flag]

    return get


# (bundle cache, precision, form cache dtype, atol on the last logits vs the bundle's graph):
# fp32 forms dequantize the same int8 codes (or read the same fp16 values) in fp32, where the
# bundle's fp16 GQA computes in fp16; fp16 forms round everything else as well (5e-2, as in
# test_native_form.py), and an fp16 form quantizes k/scale in fp16, so a code may land one
# step from the bundle's fp32 rounding (measured 0.062 at worst: 1e-1)
CASES = [("int8", "fp32", "int8", 2e-3), ("fp16", "fp32", "float16", 5e-2),
         ("int8", "fp16", "int8", 1e-1), ("fp16", "fp16", "float16", 5e-2)]


@pytest.mark.parametrize("flag,precision,cache,atol", CASES)
def test_native_form_reads_the_bundles_cache(flag, precision, cache, atol, kv_bundle, ort_session):
    bundle = kv_bundle(flag)
    form = form_for(bundle, precision=precision, **NATIVE)
    pasts = {p for p, _ in read_manifest(bundle).kv.pairs()}
    assert {t.dtype for t in form.stage.inputs if t.name in pasts} == {cache}
    steps = ragged_steps()
    got = run_form(ort_session, form.model, read_manifest(bundle), steps)
    for i, (ref, (last, ids)) in enumerate(zip(run_reference(bundle, steps), got)):
        np.testing.assert_allclose(last, ref, atol=atol, rtol=0, err_msg=f"step {i}")
        np.testing.assert_array_equal(ids, last.argmax(-1))


def test_fp16_cache_for_an_fp32_bundle_by_flag(exported_bundle, ort_session):
    """arx build --kv-dtype fp16 --precision fp32 on a plain bundle: casts around the writes."""
    bundle = exported_bundle("llama")
    form = form_for(bundle, precision="fp32", kv_dtype="fp16", **NATIVE)
    steps = ragged_steps()
    got = run_form(ort_session, form.model, read_manifest(bundle), steps)
    for ref, (last, _) in zip(run_reference(bundle, steps), got):
        np.testing.assert_allclose(last, ref, atol=5e-2, rtol=0)


def test_plugin_form_keeps_the_precisions_cache(kv_bundle, ort_session):
    """An fp16 cache is the fp16 plugin form's own: it builds and matches."""
    bundle = kv_bundle("fp16")
    form = form_for(bundle, precision="fp16")
    steps = ragged_steps()
    got = run_form(ort_session, form.model, read_manifest(bundle), steps)
    for ref, (last, _) in zip(run_reference(bundle, steps), got):
        np.testing.assert_allclose(last, ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("flag,kw,match", [
    ("int8", {"precision": "fp16"}, "plugin reads its cache in the engine's precision"),
    ("fp16", {"precision": "fp32"}, "a float16 cache builds with --attention native"),
    (None, {"kv_dtype": "int8", **NATIVE}, "needs the scales arx calibrate measures"),
    (None, {"kv_dtype": "fp32", "precision": "fp16"}, "must be one of|keeps a float16 cache"),
])
def test_refusals_are_one_line(flag, kw, match, kv_bundle, exported_bundle, tmp_path):
    bundle = kv_bundle(flag) if flag else exported_bundle("llama")
    with pytest.raises(ArxError, match=match):
        build_bundle(bundle, BuildOptions(target="orin", kit=True, progress=False,
                                          output=tmp_path / "kit", **kw))
    assert not (tmp_path / "kit").exists()


def test_kit_records_the_cache(kv_bundle, tmp_path):
    out = tmp_path / "kit"
    build_bundle(kv_bundle("int8"), BuildOptions(target="orin", kit=True, progress=False,
                                                 output=out, precision="fp16", **NATIVE))
    kv = json.loads((out / "kit.json").read_text())["kv"]
    assert (kv["dtype"], kv["scales"]) == ("int8", "per_channel")


@pytest.mark.parametrize("flag,precision", [("int8", "fp32"), ("int8", "fp16"), ("fp16", "fp32")])
def test_engine_check_passes_on_the_cache(flag, precision, kv_bundle):
    """The engine check (ORT standing in for the engine) compares every layer's int8/fp16
    cache with the bundle's own: it passes, the cache compared in its dtype's values."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from arx.builder import check

    bundle = kv_bundle(flag)
    form = form_for(bundle, precision=precision, **NATIVE)
    runner = OnnxrtRunner(ort.InferenceSession(form.model.SerializeToString(),
                                               providers=["CPUExecutionProvider"]))
    report = check.check_runner(runner, bundle, read_manifest(bundle), form.stage.to_json(),
                                form.spec.s_max, precision)
    assert report["passed"], report.get("message")
    assert report["outputs"]["present.0.key"]["max_abs"] <= report["outputs"]["present.0.key"]["atol"]
    # int8 codes of keys computed in fp16 are checked at the int8 tolerance (builder/check.py)
    assert report["tolerance"] == (0.05 if (flag, precision) == ("int8", "fp16") else 0.01)
