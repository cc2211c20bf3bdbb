"""The engine check (builder/check.py + builder/trt_check.py): Polygraphy's comparator between an
engine and ONNX Runtime on the bundle's graph, a ragged prefill + decode steps, each runner
carrying its own cache.

No TensorRT here, so ONNX Runtime stands in for the engine: Polygraphy's OnnxrtRunner runs the
TensorRT form (plugin-free on ORT's own kernels; the plugin form with its NumPy references as
Python ops) behind the same cache carrier the TrtRunner gets in arx build and in the kits.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from form_runs import form_for
from onnx import numpy_helper

from arx.builder import check, trt_check
from arx.errors import ArxError
from arx.manifest import read_manifest

pytest.importorskip("polygraphy")
from polygraphy.backend.onnxrt import OnnxrtRunner  # noqa: E402

NATIVE = {"attention": "native", "sampler": "argmax"}


def _ort_runner(model: onnx.ModelProto):
    import onnxruntime as ort

    return OnnxrtRunner(ort.InferenceSession(model.SerializeToString(),
                                             providers=["CPUExecutionProvider"]))


def _check(bundle, form, precision="fp32", runner=None):
    m = read_manifest(bundle)
    return check.check_runner(runner or _ort_runner(form.proto), bundle, m, form.stage.to_json(),
                              form.spec.s_max, precision)


def _perturb_keys(model: onnx.ModelProto, kv_width: int, layer: int = 1) -> None:
    """Scale the key columns of `layer`'s fused q|k|v projection by 1.5: a mis-built engine's
    kind of error, in one layer's keys only."""
    name = f"layers.{layer}.attn.qkv_proj.weight"
    init = next(i for i in model.graph.initializer if i.name == name)
    w = numpy_helper.to_array(init).copy()
    q_width = w.shape[1] - 2 * kv_width
    w[:, q_width:q_width + kv_width] *= 1.5
    init.CopyFrom(numpy_helper.from_array(w, name))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_native_form_passes_against_the_bundle(exported_bundle, precision):
    bundle = exported_bundle("llama")
    form = form_for(bundle, precision=precision, **NATIVE)
    report = _check(bundle, form, precision)
    layers = read_manifest(bundle).kv.layers
    assert report["passed"], report.get("message")
    assert report["steps"] == 1 + check.DECODE_STEPS
    assert set(report["outputs"]) == {"last_logits", *(f"present.{i}.{kv}" for i in range(layers)
                                                       for kv in ("key", "value"))}
    for name, o in report["outputs"].items():
        assert 0 <= o["max_abs"] <= o["atol"], name
        assert o["atol"] > 0
    assert report["token_ids"]["mismatches"] == 0
    assert report["token_ids"]["tokens"] == len(check.PROMPT_LENS) * report["steps"]
    if precision == "fp32":  # ORT's kernels on the same fp32 math: far inside the tolerance
        assert report["outputs"]["last_logits"]["max_abs"] < 1e-4


def test_perturbed_weight_is_refused_naming_the_worst_output(exported_bundle):
    bundle = exported_bundle("llama")
    kv = read_manifest(bundle).kv
    form = form_for(bundle, precision="fp16", **NATIVE)
    _perturb_keys(form.proto, kv.kv_heads * kv.head_dim)
    report = _check(bundle, form, "fp16")
    assert not report["passed"]
    # layer 0 and layer 1's values are untouched; layer 1's keys are where the error starts
    outputs = report["outputs"]
    assert all(outputs[n]["passed"] for n in ("present.0.key", "present.0.value", "present.1.value"))
    assert not outputs["present.1.key"]["passed"] and not outputs["last_logits"]["passed"]
    assert report["worst"] == "present.1.key"
    assert report["message"].startswith("present.1.key differs from ONNX Runtime by ")
    with pytest.raises(ArxError) as e:
        check.gate(report, force=False)
    line = str(e.value)
    assert "\n" not in line and "present.1.key" in line and "--force" in line
    check.gate(report, force=True)  # kept, and recorded as forced
    assert report["forced"] is True


def test_plugin_form_passes(exported_bundle, ort_session):
    bundle = exported_bundle("llama")
    form = form_for(bundle, precision="fp32")
    report = _check(bundle, form, "fp32", runner=OnnxrtRunner(ort_session(form.proto)))
    assert report["passed"], report.get("message")
    assert report["outputs"]["last_logits"]["max_abs"] < 1e-4
    assert report["token_ids"]["mismatches"] == 0


def test_steps_round_trip_through_the_kit_format(tmp_path, exported_bundle):
    bundle = exported_bundle("llama")
    m = read_manifest(bundle)
    form = form_for(bundle, **NATIVE)
    feeds, reference = check.check_data(bundle, m, form.stage.to_json(), form.spec.s_max)
    check.save_steps(tmp_path / "s.npz", feeds)
    loaded = trt_check.load_steps(tmp_path / "s.npz")
    assert len(loaded) == len(feeds) == 1 + check.DECODE_STEPS
    for a, b in zip(feeds, loaded):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype
    # the feeds are the engine's step inputs without the cache, as arx generate --engine feeds
    assert set(feeds[0]) == {t["name"] for t in form.stage.to_json()["inputs"]
                             if not t["name"].startswith("past_key_values")}
    assert feeds[1]["past_lengths"].tolist() == list(check.PROMPT_LENS)


def _fake_engine_build(monkeypatch, kv_width=None):
    """arx build with ORT standing in for TensorRT: the "engine" is the TensorRT form's ONNX
    (keys of layer 1 scaled when kv_width is given), checked by Polygraphy's OnnxrtRunner."""
    import onnxruntime as ort

    from arx.builder import build, engine, trt_build

    def fake_build(plan, onnx_path, engine_path, timing_cache_path=None, log=print):
        model = onnx.load(onnx_path)
        if kv_width:
            _perturb_keys(model, kv_width)
        with open(engine_path, "wb") as f:
            f.write(model.SerializeToString())
        return {"engine": "decoder.engine"}

    def fake_check(path, bundle, manifest, io, s_max, precision):
        runner = OnnxrtRunner(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        return check.check_runner(runner, bundle, manifest, io, s_max, precision)

    monkeypatch.setattr(build, "engine_unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    monkeypatch.setattr(engine, "check_engine_file", fake_check)


def _copy(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "b.arx")


@pytest.mark.parametrize("force", [False, True])
def test_arx_build_refuses_an_engine_over_the_tolerance(exported_bundle, tmp_path, monkeypatch,
                                                        capsys, force):
    from arx.cli import main

    bundle = _copy(exported_bundle("llama"), tmp_path)
    kv = read_manifest(bundle).kv
    _fake_engine_build(monkeypatch, kv.kv_heads * kv.head_dim)
    argv = [str(bundle), "--target", "h100", "--no-plugins", "--max-seq-len", "24", "-q"]
    code = main(["build", *argv, *(["--force"] if force else [])])
    err = capsys.readouterr().err
    if not force:
        assert code == 2
        assert err.count("\n") == 1 and err.startswith("arx: error: engine check failed: ")
        assert "present.1.key" in err and "--force" in err
        assert not (bundle / "engines" / "h100").exists()  # nothing half written
        assert "h100" not in read_manifest(bundle).builds
        return
    assert code == 0, err
    entry = read_manifest(bundle).builds["h100"]
    assert entry["check"]["passed"] is False and entry["check"]["forced"] is True
    assert entry["check"]["worst"] == "present.1.key"
    report = json.loads((bundle / "engines" / "h100" / "build_report.json").read_text())
    assert report["check"] == entry["check"]


def test_arx_build_records_a_passing_check(exported_bundle, tmp_path, monkeypatch, capsys):
    from arx.cli import main

    bundle = _copy(exported_bundle("llama"), tmp_path)
    _fake_engine_build(monkeypatch)
    code = main(["build", str(bundle), "--target", "h100", "--no-plugins", "--precision", "fp16",
                 "--max-seq-len", "24", "-q"])
    assert code == 0, capsys.readouterr().err
    entry = read_manifest(bundle).builds["h100"]
    assert entry["check"]["passed"] and not entry["check"]["forced"]
    assert entry["check"]["precision"] == "fp16" and entry["check"]["tolerance"] == 1e-2


def test_kit_ships_the_check_and_its_command_line_parses_back(exported_bundle, tmp_path,
                                                              monkeypatch):
    """The kit's check script is trt_check.py byte for byte and compiles; the command line
    build_engine.py runs after a build (captured, TensorRT faked) parses with its parser into
    the kit's own files, the precision's tolerance and (plugin kits) the plugin folder; and the
    kit's steps and reference pass with ORT running the kit's own plugin-free form."""
    import importlib.util
    import py_compile
    import subprocess
    from pathlib import Path

    from arx.builder.build import build_bundle
    from arx.builder.options import BuildOptions

    bundle = _copy(exported_bundle("llama"), tmp_path)
    for kind, extra in (("plugins", {}), ("native", NATIVE)):
        kit = build_bundle(bundle, BuildOptions(target="orin", precision="fp16", kit=True,
                                                max_seq_len=24, ptx=False, progress=False,
                                                output=tmp_path / kind, **extra)).path
        meta = json.loads((kit / "kit.json").read_text())
        assert (kit / "check_engine.py").read_bytes() == Path(trt_check.__file__).read_bytes()
        py_compile.compile(str(kit / "check_engine.py"), doraise=True)
        assert {"check_engine.py", "check_inputs.npz", "check_reference.npz"} <= set(meta["files"])

        spec = importlib.util.spec_from_file_location(f"kit_build_{kind}", kit / "build_engine.py")
        build_engine = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build_engine)
        ran = []
        monkeypatch.setattr(build_engine, "build_engine", lambda *a, **k: {
            "engine": "decoder.engine", "engine_bytes": 0, "build_s": 0})
        monkeypatch.setattr(subprocess, "call", lambda cmd, cwd: ran.append((cmd, cwd)) or 0)
        monkeypatch.setitem(__import__("sys").modules, "kit_plugins",
                            type("kp", (), {"register": staticmethod(lambda d: None)}))
        assert build_engine.main(["--kit", str(kit), "--force"]) == 0
        (cmd, cwd), = ran
        assert cwd == str(kit) and cmd[1] == "check_engine.py"
        args = trt_check.parser().parse_args(cmd[2:])
        assert args.force and args.precision == "fp16" and args.tolerance == check.TOLERANCES["fp16"]
        assert Path(args.engine) == kit / meta["build"]["engine"]
        for path in (args.inputs, args.reference, args.kit_json):
            assert (kit / path).is_file(), path
        assert args.report == "build_report.json"
        assert (args.plugins == "plugins") == (kind == "plugins")
        assert build_engine.main(["--kit", str(kit), "--no-check"]) == 0 and len(ran) == 1

    native = tmp_path / "native"
    aliases = json.loads((native / "kit.json").read_text())["kv"]["aliases"]
    runner = trt_check.cache_carrier(_ort_runner(onnx.load(str(native / "decoder.trt.onnx"))), aliases)
    report = trt_check.run_check(runner, trt_check.load_steps(native / "check_inputs.npz"),
                                 trt_check.load_steps(native / "check_reference.npz"), "fp16",
                                 check.TOLERANCES["fp16"])
    assert report["passed"], report.get("message")
