"""The TensorRT form of a next-scale (VAR) bundle, run by ONNX Runtime (plugins as NumPy PyOps).

The form takes inputs_embeds, steps every row with the block mask (the arx::kv_attention
plugin's mask="block", or ONNX Attention with every row flagged block), and returns every
position's logits for the host sampler. Its logits over the whole schedule (the SOS step, then
one step per scale after the cache of all earlier ones) equal the bundle's own general-step
graph on the same embeddings; the profiles are the schedule's block widths.
"""

from __future__ import annotations

import numpy as np
import pytest
from form_runs import form_for

from arx.builder.options import BuildOptions
from arx.builder.profiles import block_widths, make_profiles
from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession

S_MAX = 66  # the schedule's 1 + 4 + 9 + 16 + 36 tokens
FORM = {"sampler": "none", "logits": "all", "max_seq_len": S_MAX}


@pytest.fixture(scope="module")
def bundle(var_export):
    return var_export[1]


def _schedule(manifest, batch: int = 2):
    """(inputs_embeds (B, n, Cvae + D)) per scale: random features, fixed per-row conditions."""
    rng = np.random.default_rng(0)
    width = manifest.decoder.inputs[0].shape[-1]
    cond = rng.standard_normal((batch, 1, width - 8)).astype(np.float32)
    steps = []
    for pn in manifest.extensions["var"]["patch_nums"]:
        feat = rng.standard_normal((batch, pn * pn, 8)).astype(np.float32)
        steps.append(np.concatenate([feat, np.repeat(cond, pn * pn, axis=1)], axis=-1))
    return steps


def _reference(bundle, steps):
    with DecoderSession(bundle) as session:
        cache = session.new_cache(len(steps[0]), S_MAX)
        return [session.step(cache, None, np.full(len(e), e.shape[1]), logits="all",
                             mask="block", inputs_embeds=e) for e in steps]


def _run(ort_session, model, manifest, steps):
    session = ort_session(model)
    types = {i.name for i in session.get_inputs()}
    kv, b = manifest.kv, len(steps[0])
    caches = {p: np.zeros((b, kv.kv_heads, S_MAX, kv.head_dim), np.float32) for p, _ in kv.pairs()}
    lengths, out = np.zeros(b, np.int64), []
    names = [o.name for o in session.get_outputs()]
    for embeds in steps:
        n = embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "past_lengths": lengths, "new_lengths": np.full(b, n),
                 "position_ids": lengths[:, None] + np.arange(n)[None], **caches}
        got = dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in types})))
        for past, present in kv.pairs():
            caches[past] = got[present]  # ORT has no aliasing: feed the updated cache back
        lengths = lengths + n
        out.append(got["logits"])
    return out


@pytest.mark.parametrize("attention", ["native", "plugin"])
def test_form_logits_of_every_scale_equal_the_bundle(bundle, ort_session, attention):
    manifest = read_manifest(bundle)
    steps = _schedule(manifest)
    form = form_for(bundle, attention=attention, **FORM)
    assert [t.name for t in form.stage.outputs][0] == "logits"
    assert form.stage.inputs[0].name == "inputs_embeds"
    for k, (got, ref) in enumerate(zip(_run(ort_session, form.proto, manifest, steps),
                                       _reference(bundle, steps))):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"scale {k}")


def test_profiles_are_the_block_widths(bundle):
    manifest = read_manifest(bundle)
    form = form_for(bundle, attention="native", **FORM)
    options = BuildOptions(target="h100", max_seq_len=S_MAX, sampler="none", logits="all",
                           max_batch=4)
    profiles = make_profiles(form.stage, options, S_MAX, block_widths(manifest))
    assert [p.name for p in profiles] == ["decode", "scale_4", "scale_9", "scale_16", "scale_36"]
    for p, w in zip(profiles, (1, 4, 9, 16, 36)):
        lo, opt, hi = p.shapes["inputs_embeds"]
        assert lo[1] == opt[1] == hi[1] == w and (lo[0], hi[0]) == (1, 4)


def test_form_needs_host_sampling(bundle):
    with pytest.raises(ArxError, match="--sampler none --logits all"):
        form_for(bundle, attention="native", max_seq_len=S_MAX)


# --- the engine check (builder/var_check.py): the whole schedule, ORT standing in for TensorRT

def _check(bundle, form, runner, precision="fp32"):
    from arx.builder import check

    return check.check_runner(runner, bundle, read_manifest(bundle), form.stage.to_json(),
                              form.spec.s_max, precision)


def _runner(model, ort_session=None):
    pytest.importorskip("polygraphy")
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(ort_session(model) if ort_session else ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]))


def perturb_keys(model, layer: int = 1) -> None:
    """Scale the key columns of `layer`'s fused qkv projection by 1.5 (the weight of the MatMul
    whose output gets inner.blocks.<layer>.qkv.bias): one layer's keys wrong, as a mis-built
    engine's would be."""
    from onnx import numpy_helper

    g, bias = model.graph, f"inner.blocks.{layer}.qkv.bias"
    add = next(n for n in g.node if bias in n.input)
    x = next(i for i in add.input if i != bias)
    matmul = next(n for n in g.node if x in n.output)
    init = next(i for i in g.initializer if i.name in matmul.input)
    w = numpy_helper.to_array(init).copy()
    width = w.shape[1] // 3  # q | k | v
    w[:, width:2 * width] *= 1.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))


@pytest.mark.parametrize("attention,precision", [("native", "fp32"), ("plugin", "fp32"),
                                                 ("native", "fp16")])
def test_engine_check_passes_over_the_whole_schedule(bundle, ort_session, attention, precision):
    form = form_for(bundle, attention=attention, precision=precision, **FORM)
    report = _check(bundle, form, _runner(form.proto, ort_session if attention == "plugin"
                                          else None), precision)
    layers = read_manifest(bundle).kv.layers
    assert report["passed"], report.get("message")
    assert report["steps"] == 5  # the SOS step and one step per further scale
    assert set(report["outputs"]) == {"logits", *(f"present.{i}.{kv}" for i in range(layers)
                                                  for kv in ("key", "value"))}
    assert all(o["atol"] > 0 for o in report["outputs"].values())
    if precision == "fp32":
        assert report["outputs"]["logits"]["max_abs"] < 1e-4


def test_check_steps_are_the_real_schedule(bundle):
    """The feeds are block steps of the scale widths over [cond; null], with the features
    var_next_input_k made (zero for the SOS step); the reference is the bundle's general-step
    graph on exactly those embeddings."""
    from arx.builder import check

    m = read_manifest(bundle)
    form = form_for(bundle, attention="native", **FORM)
    feeds, reference = check.check_data(bundle, m, form.stage.to_json(), S_MAX)
    assert [f["inputs_embeds"].shape[:2] for f in feeds] == [(2, w) for w in (1, 4, 9, 16, 36)]
    assert [f["past_lengths"].tolist() for f in feeds] == [[p, p] for p in (0, 1, 5, 14, 30)]
    assert set(feeds[0]) == {t["name"] for t in form.stage.to_json()["inputs"]
                             if not t["name"].startswith("past_key_values")}
    embeds = [f["inputs_embeds"] for f in feeds]
    assert not embeds[0][..., :8].any() and all(e[..., :8].any() for e in embeds[1:])
    np.testing.assert_array_equal(embeds[2][0, :, :8], embeds[2][1, :, :8])  # both halves
    assert not np.array_equal(embeds[0][0, 0, 8:], embeds[0][1, 0, 8:])  # class vs null
    for ref, want in zip(reference, _reference(bundle, embeds)):
        np.testing.assert_array_equal(ref["logits"], want)


def test_perturbed_weight_is_refused_naming_the_worst_output(bundle):
    from arx.builder import check

    form = form_for(bundle, attention="native", precision="fp16", **FORM)
    perturb_keys(form.proto)
    report = _check(bundle, form, _runner(form.proto), "fp16")
    outputs = report["outputs"]
    assert not report["passed"]
    assert all(outputs[n]["passed"] for n in ("present.0.key", "present.0.value"))
    assert not outputs["present.1.key"]["passed"]  # where the error is, not only its effect
    assert report["worst"] == "present.1.key"
    assert report["message"].startswith("present.1.key differs from ONNX Runtime by ")
    with pytest.raises(ArxError) as e:
        check.gate(report, force=False)
    assert "\n" not in str(e.value) and "present.1.key" in str(e.value)


def test_check_needs_the_whole_schedule_in_the_cache(bundle):
    from arx.builder import check

    form = form_for(bundle, attention="native", **FORM)
    with pytest.raises(ArxError, match="--max-seq-len >= 66"):
        check.check_data(bundle, read_manifest(bundle), form.stage.to_json(), 60)


# --- arx build (kit and engine) and arx generate --engine on a next-scale bundle

def _copy(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "var.arx")


def test_kit_of_the_issue_command(bundle, tmp_path, ort_session):
    """`arx build var.arx --target thor --precision fp16 --kit` (no --sampler/--logits: a
    next-scale bundle's defaults): the decoder's form with the per-scale profiles, the VQ
    decoder's engine script, the ORT stages, kit.json listing them; the scripts compile and
    the kit's own check data pass with ORT running the kit's own form."""
    import json
    import py_compile
    import subprocess

    import onnx

    from arx.builder import trt_check
    from arx.cli import main

    b, out = _copy(bundle, tmp_path), tmp_path / "kit"
    assert main(["build", str(b), "--target", "thor", "--precision", "fp16", "--kit", "--no-ptx",
                 "-o", str(out), "-q"]) == 0
    meta = json.loads((out / "kit.json").read_text())
    names = [s["name"] for s in meta["stages"]]
    assert names == ["decoder", "var_class", *(f"var_next_input_{k}" for k in range(5)),
                     "vq_decoder"]
    assert {s["name"] for s in meta["stages"] if s.get("runtime") == "onnxruntime"} == \
        set(names[1:-1])
    assert all((out / f).is_file() for f in meta["files"])
    assert all(s["onnx"] in meta["files"] for s in meta["stages"])
    assert [p["name"] for p in meta["build"]["profiles"]] == \
        ["decode", "scale_4", "scale_9", "scale_16", "scale_36"]
    vq = meta["stages"][-1]["profiles"][0]["shapes"]["f_hat"]
    assert vq["min"] == [1, 8, 6, 6] and vq["max"][1:] == [8, 6, 6]
    assert [t["name"] for t in meta["io"]["outputs"]][0] == "logits"
    for script in ("build_engine.py", "check_engine.py"):
        py_compile.compile(str(out / script), doraise=True)
    for script in ("build_vq_decoder.sh", "build_trtexec.sh"):
        subprocess.run(["bash", "-n", str(out / script)], check=True)
    readme = (out / "README.md").read_text()
    assert "whole scale schedule" in readme and "var_next_input" in readme
    assert read_manifest(b).builds["thor"]["kind"] == "kit"

    runner = trt_check.cache_carrier(_runner(onnx.load(str(out / "decoder.trt.onnx")),
                                             ort_session), meta["kv"]["aliases"])
    report = trt_check.run_check(runner, trt_check.load_steps(out / "check_inputs.npz"),
                                 trt_check.load_steps(out / "check_reference.npz"), "fp16",
                                 meta["check"]["tolerance"])
    assert report["passed"], report.get("message")
    assert report["steps"] == 5 and "logits" in report["outputs"]


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-6), ("fp16", 2e-2)])
def test_kit_vq_decoder_gives_the_bundle_pixels(bundle, precision, atol):
    import onnxruntime as ort

    from arx.builder.image_kit import vq_form
    from arx.runtime.var_generate import VarStages, var_info

    m = read_manifest(bundle)
    info = var_info(m)
    f_hat = np.random.default_rng(0).standard_normal((3, 8, 6, 6)).astype(np.float32)
    with VarStages(bundle, m, info) as stages:
        want = stages.pixels(f_hat)
    model, _ = vq_form(bundle, m, precision, info.vq_stage)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]) \
        .run(None, {"f_hat": f_hat})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def _engine_check_module():
    """tests/builder/test_engine_check.py (its fake TensorRT build, not a second copy)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("test_engine_check.py")
    spec = importlib.util.spec_from_file_location("arx_test_engine_check_var", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("perturbed", [False, True])
def test_engine_build_checks_the_schedule(bundle, tmp_path, monkeypatch, capsys, perturbed):
    """arx build in engine mode, ORT standing in for TensorRT (test_engine_check's fake): a good
    engine is kept with its check recorded, one with layer 1's keys off is refused in one line
    naming present.1.key, nothing written."""
    pytest.importorskip("polygraphy")
    from arx.cli import main

    fake = _engine_check_module()
    monkeypatch.setattr(fake, "_perturb_keys", lambda model, _: perturb_keys(model))
    b = _copy(bundle, tmp_path)
    fake._fake_engine_build(monkeypatch, 1 if perturbed else None)
    code = main(["build", str(b), "--target", "h100", "--no-plugins", "--precision", "fp16", "-q"])
    err = capsys.readouterr().err
    if perturbed:
        assert code == 2 and err.count("\n") == 1 and "present.1.key" in err
        assert not (b / "engines" / "h100").exists() and "h100" not in read_manifest(b).builds
        return
    assert code == 0, err
    entry = read_manifest(b).builds["h100"]
    assert entry["check"]["passed"] and entry["check"]["steps"] == 5
    assert {t["name"] for t in entry["io"]["inputs"]} >= {"inputs_embeds", "past_lengths"}


@pytest.fixture
def var_engine(monkeypatch, ort_session):
    """`arx generate BUNDLE --engine h100` with open_engine serving the ORT-run form."""
    import importlib.util
    from contextlib import contextmanager
    from pathlib import Path

    from arx.runtime import engine_session

    path = Path(__file__).with_name("test_engine_session.py")
    spec = importlib.util.spec_from_file_location("arx_test_engine_session_var", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def use(bundle, max_batch=4):
        m = read_manifest(bundle)
        form = form_for(bundle, attention="plugin", max_batch=max_batch, **FORM)
        report = {"io": form.stage.to_json(), "max_seq_len": S_MAX, "max_batch": max_batch}
        backend = module.OrtFormBackend(ort_session(form.proto), {q: p for p, q in m.kv.pairs()})

        @contextmanager
        def fake_open(path, target):
            assert str(path) == str(bundle) and target == "h100"
            yield engine_session.EngineSession(backend, report, m)

        monkeypatch.setattr(engine_session, "open_engine", fake_open)
        monkeypatch.setattr("arx.needs.check", lambda *a, **k: None)  # no TensorRT here

    return use


def _cli_images(args, capsys) -> list:
    import json

    from arx.cli import main

    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)["images"]


def test_cli_generate_on_the_engine_equals_ort(bundle, var_engine, tmp_path, capsys):
    var_engine(bundle)
    args = ["generate", str(bundle), "--class", "1", "--class", "3", "--greedy", "--cfg", "3",
            "--json", "--image", str(tmp_path / "grid.png")]
    on_engine = _cli_images(args + ["--engine", "h100"], capsys)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_engine == _cli_images(args, capsys)


def test_cli_engine_too_small_is_refused_in_one_line(bundle, var_engine, tmp_path, capsys):
    from arx.cli import main

    var_engine(bundle, max_batch=2)
    out = tmp_path / "x.png"
    code = main(["generate", str(bundle), "--class", "1", "--class", "2", "--cfg", "3",
                 "--engine", "h100", "--image", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "max batch of 2" in err[0] and not out.exists()
