"""The TensorRT form of image-token bundles (builder/image_form.py), run by ONNX Runtime.

The engine here is the form on ORT through IO binding (test_engine_session.py's backend: the
cache written in place), behind runtime/image_engine.py's session, driven by the same image loop
as the ORT run: greedy CFG grids equal the bundle's (class-conditional module at batch 3, a tiny
Janus with ragged prompts) in the plugin form (the CFG mix inside arx::sample) and the native
form with host sampling; seeded, arx::sample's ids are the reference's on the form's own logits
and, each image drawn as row 0 (the `row` input at zeros), the ORT run's at batch 3.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from form_runs import form_for
from image_bundle import CODEBOOK

from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.plugins.sampling.reference import sample_reference
from arx.runtime.decoder import DecoderSession
from arx.runtime.engine_session import EngineSession
from arx.runtime.image_engine import ImageEngineSession
from arx.runtime.image_generate import ImageOptions, generate_images
from arx.runtime.sampler import SamplingOptions

LABELS = [0, 3, 4]  # 6 cache rows with the null class
S_MAX = 17  # the c2i bundle's context: its class token and 16 image tokens
FORMS = {"plugin": {}, "native-host": {"attention": "native", "sampler": "none"}}
GREEDY = ImageOptions(cfg_scale=4.0, sampling=SamplingOptions(do_sample=False))
SEEDED = ImageOptions(cfg_scale=3.0, cfg_schedule="linear",
                      sampling=SamplingOptions(do_sample=True, seed=11, top_k=20, top_p=0.9))


@pytest.fixture(scope="module")
def c2i(c2i_export):
    return c2i_export[1]


@pytest.fixture(scope="module")
def backends():
    """test_engine_session.py's ORT backend of the form (one copy of it, not two)."""
    path = Path(__file__).with_name("test_engine_session.py")
    spec = importlib.util.spec_from_file_location("arx_test_engine_session_image", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OrtFormBackend


def _engine(bundle, ort_session, backends, s_max=S_MAX, backend_type=None, **form):
    m = read_manifest(bundle)
    built = form_for(bundle, max_seq_len=s_max, max_batch=6, **form)
    report = {"io": built.stage.to_json(), "max_seq_len": s_max, "max_batch": 6}
    backend = (backend_type or backends)(ort_session(built.proto),
                                         {q: p for p, q in m.kv.pairs()})
    return ImageEngineSession(EngineSession(backend, report, m), bundle)


def _ort(bundle, labels, options):
    with DecoderSession(bundle) as session:
        return generate_images(session, labels, options).tokens


@pytest.mark.parametrize("form", FORMS)
def test_greedy_cfg_grids_equal_the_bundle_batch_3(c2i, ort_session, backends, form):
    engine = _engine(c2i, ort_session, backends, **FORMS[form])
    assert engine.draws == (form == "plugin")
    got = generate_images(engine, LABELS, GREEDY).tokens
    np.testing.assert_array_equal(got, _ort(c2i, LABELS, GREEDY))
    assert engine.engine.backend.live == 0  # the cache buffers were released


def test_seeded_host_sampling_engine_equals_the_bundle(c2i, ort_session, backends):
    engine = _engine(c2i, ort_session, backends, **FORMS["native-host"])
    np.testing.assert_array_equal(generate_images(engine, LABELS, SEEDED).tokens,
                                  _ort(c2i, LABELS, SEEDED))


def test_device_sampler_draws_the_reference_ids(c2i, ort_session, backends):
    """Every step: token_ids = arx::sample's reference on the form's own last logits (the
    codebook's columns of the [cond; null] rows) with the loop's feeds: seed + i per image, the
    token's position as offset, row 0 for every image, the linear schedule's scale."""
    calls = []

    class Recording(backends):
        def run(self, feeds):
            out = super().run(feeds)
            calls.append(({k: np.array(v) for k, v in feeds.items()
                           if k in ("sampling_params", "seed", "offset", "row")}, out))
            return out

    engine = _engine(c2i, ort_session, backends, backend_type=Recording)
    got = generate_images(engine, LABELS, SEEDED).tokens
    assert len(calls) == 16
    for k, (feeds, out) in enumerate(calls):
        assert feeds["seed"].tolist() == [11, 12, 13] and feeds["offset"].tolist() == [1 + k] * 3
        assert feeds["row"].tolist() == [0, 0, 0]
        assert feeds["sampling_params"][0, 4] == pytest.approx(SEEDED.scale_at(k, 16))
        want = sample_reference(out["last_logits"][:, :CODEBOOK], feeds["sampling_params"],
                                np.zeros((3, CODEBOOK), bool), feeds["seed"], feeds["offset"],
                                feeds["row"])
        np.testing.assert_array_equal(out["token_ids"], want)
    again = generate_images(_engine(c2i, ort_session, backends), LABELS, SEEDED).tokens
    np.testing.assert_array_equal(got, again)


def test_seeded_device_sampler_grids_equal_the_bundle_batch_3(c2i, ort_session, backends):
    """arx::sample on the engine draws every image as the host loop does (row 0, seed + i), so
    the seeded batch is the ORT run's, and an image alone is the same image in the batch."""
    engine = _engine(c2i, ort_session, backends)
    got = generate_images(engine, LABELS, SEEDED).tokens
    want = _ort(c2i, LABELS, SEEDED)
    assert len({g.tobytes() for g in want}) == 3  # three different images, not one repeated
    np.testing.assert_array_equal(got, want)
    # image 2 of the batch used seed 11 + 2: alone with that seed it is the same image
    alone = replace(SEEDED, sampling=replace(SEEDED.sampling, seed=13))
    np.testing.assert_array_equal(generate_images(engine, LABELS[2:], alone).tokens[0], got[2])


def test_sampler_feeds_are_per_image(c2i):
    form = form_for(c2i, max_seq_len=S_MAX)
    io = {t.name: t.shape for t in form.stage.inputs}
    assert io["sampling_params"] == ("images", 5) and io["presence"] == ("images", CODEBOOK)
    assert io["input_ids"][0] != "images"
    node = next(n for n in form.proto.graph.node if n.op_type == "sample")
    assert [a.i for a in node.attribute if a.name == "guidance"] == [1]


@pytest.mark.parametrize("form,match", [({"sampler": "argmax"}, "--sampler plugin"),
                                        ({"sampler": "none", "logits": "all"}, "--logits last")])
def test_form_refusals_in_one_line(c2i, form, match):
    with pytest.raises(ArxError, match=match) as e:
        form_for(c2i, max_seq_len=S_MAX, **form)
    assert "\n" not in str(e.value)


def test_unguided_run_on_a_guided_engine_is_refused(c2i, ort_session, backends):
    engine = _engine(c2i, ort_session, backends)
    options = ImageOptions(cfg_scale=1.0, sampling=SamplingOptions(do_sample=False))
    with pytest.raises(ArxError, match="--cfg 1"):
        generate_images(engine, LABELS, options)
    assert engine.engine.backend.live == 0


@pytest.mark.parametrize("form", FORMS)
def test_janus_greedy_cfg_grids_equal_the_bundle(form, ort_session, backends, tmp_path_factory):
    pytest.importorskip("transformers")
    from janus_models import BOI, BOS, exported_janus

    from arx.runtime.janus_generate import generate_images_from_prompts

    _, bundle, _ = exported_janus("small", tmp_path_factory.getbasetemp())
    prompts = [[BOS, 10, 11, 12, 13, BOI], [BOS, 20, 21, BOI]]  # ragged
    options = ImageOptions(cfg_scale=5.0, sampling=SamplingOptions(do_sample=False))
    engine = _engine(bundle, ort_session, backends, s_max=24, **FORMS[form])
    assert "inputs_embeds" in engine.engine.inputs
    got = generate_images_from_prompts(engine, prompts, options).tokens
    with DecoderSession(bundle) as session:
        want = generate_images_from_prompts(session, prompts, options).tokens
    assert len(set(want.ravel().tolist())) > 3
    np.testing.assert_array_equal(got, want)
    engine.close()


def _kit(bundle, out, **kw):
    from arx.builder.build import build_bundle
    from arx.builder.options import BuildOptions

    return build_bundle(bundle, BuildOptions(target="orin", kit=True, output=out, ptx=False,
                                             progress=False, max_seq_len=S_MAX, max_batch=8, **kw))


def test_kit_has_the_vq_decoder_engine_and_lists_both_stages(c2i, tmp_path):
    import json
    import py_compile
    import subprocess

    kit = _kit(c2i, tmp_path / "kit").path
    meta = json.loads((kit / "kit.json").read_text())
    assert [s["name"] for s in meta["stages"]] == ["decoder", "vq_decoder"]
    vq = meta["stages"][1]
    assert (vq["onnx"], vq["engine"], vq["build"]) == ("vq_decoder.onnx", "vq_decoder.engine",
                                                       "./build_vq_decoder.sh")
    assert vq["profiles"][0]["shapes"]["tokens"] == {"min": [1, 16], "opt": [2, 16],
                                                     "max": [4, 16]}  # 8 rows: 4 images
    assert {"vq_decoder.onnx", "build_vq_decoder.sh", "decoder.trt.onnx"} <= set(meta["files"])
    assert all((kit / f).is_file() for f in meta["files"])
    sampler = {t["name"]: t["shape"] for t in meta["io"]["inputs"]}["sampling_params"]
    assert sampler == ["images", 5]
    for script in ("build_engine.py", "check_engine.py"):
        py_compile.compile(str(kit / script), doraise=True)
    for script in ("build_vq_decoder.sh", "build_trtexec.sh"):
        subprocess.run(["bash", "-n", str(kit / script)], check=True)
    assert "tokens:1x16" in (kit / "build_vq_decoder.sh").read_text()
    assert "VQ decoder" in (kit / "README.md").read_text()


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-6), ("fp16", 2e-2)])
def test_vq_decoder_form_gives_the_bundle_pixels(c2i, precision, atol):
    """The kit's VQ decoder ONNX (at the kit's precision) = the bundle's stage on ORT."""
    import onnxruntime as ort

    from arx.builder.image_kit import vq_form
    from arx.runtime.image_generate import decode_pixels, image_info

    manifest = read_manifest(c2i)
    tokens = np.random.default_rng(0).integers(0, CODEBOOK, (3, 4, 4))
    want = decode_pixels(c2i, image_info(manifest), manifest, tokens)
    model, _ = vq_form(c2i, manifest, precision)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"tokens": tokens.reshape(3, -1)})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_kit_of_a_host_sampling_image_engine(c2i, tmp_path):
    import json

    kit = _kit(c2i, tmp_path / "kit", sampler="none", attention="native").path
    meta = json.loads((kit / "kit.json").read_text())
    assert [t["name"] for t in meta["io"]["outputs"]][0] == "last_logits"
    assert not (kit / "kit_plugins.py").exists() and len(meta["stages"]) == 2


@pytest.fixture
def image_cli(monkeypatch, ort_session, backends):
    """`arx generate BUNDLE --engine h100` with open_engine serving the ORT-run form."""
    from contextlib import contextmanager

    from arx.runtime import engine_session

    def use(bundle, s_max=S_MAX, **form):
        @contextmanager
        def fake_open(path, target):
            assert str(path) == str(bundle) and target == "h100"
            yield _engine(bundle, ort_session, backends, s_max=s_max, **form).engine

        monkeypatch.setattr(engine_session, "open_engine", fake_open)

    return use


def _cli_tokens(args, capsys) -> list:
    import json

    from arx.cli import main

    capsys.readouterr()
    assert main(args) == 0
    return [i["tokens"] for i in json.loads(capsys.readouterr().out)["images"]]


def test_cli_generate_class_images_on_the_engine(c2i, image_cli, tmp_path, capsys):
    image_cli(c2i)
    args = ["generate", str(c2i), "--class", "1", "--class", "3", "--greedy", "--cfg", "4",
            "--json", "--image", str(tmp_path / "grid.png")]
    on_engine = _cli_tokens(args + ["--engine", "h100"], capsys)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_engine == _cli_tokens(args, capsys)


def test_cli_generate_janus_on_the_engine(image_cli, tmp_path_factory, capsys):
    pytest.importorskip("transformers")
    from janus_models import exported_janus

    _, bundle, _ = exported_janus("small", tmp_path_factory.getbasetemp())
    image_cli(bundle, s_max=24)
    args = ["generate", str(bundle), "--prompt-ids", "1,10,11,12", "--prompt-ids", "1,20",
            "--greedy", "--cfg", "5", "--json"]
    assert _cli_tokens(args + ["--engine", "h100"], capsys) == _cli_tokens(args, capsys)


@pytest.mark.parametrize("extra,match", [(["--cfg", "1"], "--cfg 1"),
                                         (["--speculate", "jacobi"], "drop --engine")])
def test_cli_engine_refusals_in_one_line(c2i, image_cli, tmp_path, capsys, extra, match):
    from arx.cli import main

    image_cli(c2i)
    out = tmp_path / "x.png"
    code = main(["generate", str(c2i), "--class", "1", "--engine", "h100", "--image", str(out),
                 *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("arx: error:") and match in err[0]
    assert not out.exists()


@pytest.mark.parametrize("which", ["c2i", "janus"])
def test_engine_check_passes_on_image_forms(which, c2i, ort_session, tmp_path_factory):
    """arx build's engine check (ragged prefill + decode steps against the bundle on ORT) over
    the guided sampler's half-batch feeds, and over embedded ids for Janus' inputs_embeds."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from arx.builder.check import check_runner

    bundle, s_max = c2i, S_MAX
    if which == "janus":
        pytest.importorskip("transformers")
        from janus_models import exported_janus

        bundle, s_max = exported_janus("small", tmp_path_factory.getbasetemp())[1], 24
    form = form_for(bundle, max_seq_len=s_max)
    report = check_runner(OnnxrtRunner(ort_session(form.proto)), bundle, read_manifest(bundle),
                          form.stage.to_json(), s_max, "fp32")
    assert report["passed"], report["message"]


def test_shared_vocabulary_engine_samples_the_codebook_only(ort_session, backends, tmp_path):
    """Logits over text + codebook: the form slices the codebook before arx::sample (presence
    is (images, codebook)), its greedy and seeded grids are the ORT run's restricted one (an
    unrestricted argmax would pick text ids), and the engine check reads ids as codebook ids."""
    pytest.importorskip("polygraphy")
    from image_bundle import export_shared_vocab_c2i
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from arx.builder.check import check_runner

    _, bundle = export_shared_vocab_c2i(tmp_path, text=24, codebook=16, grid=4)
    form = form_for(bundle, max_seq_len=S_MAX)
    assert {t.name: t.shape for t in form.stage.inputs}["presence"] == ("images", 16)
    labels = [0, 2]
    for options in (GREEDY, ImageOptions(cfg_scale=3.0, sampling=SamplingOptions(
            do_sample=True, seed=4, top_k=8))):
        got = generate_images(_engine(bundle, ort_session, backends), labels, options).tokens
        np.testing.assert_array_equal(got, _ort(bundle, labels, options))
    report = check_runner(OnnxrtRunner(ort_session(form.proto)), bundle, read_manifest(bundle),
                          form.stage.to_json(), S_MAX, "fp32")
    assert report["passed"], report["message"]
