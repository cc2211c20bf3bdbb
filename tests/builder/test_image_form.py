"""The TensorRT form of image-token bundles (builder/image_form.py), run by ONNX Runtime.

The engine here is the form on ORT through IO binding (test_engine_session.py's backend: the
cache written in place), behind runtime/image_engine.py's session, driven by the same image loop
as the ORT run: greedy CFG grids equal the bundle's (class-conditional module at batch 3, a tiny
Janus with ragged prompts) in the plugin form (the CFG mix inside arx::sample) and the native
form with host sampling; seeded, arx::sample's ids are the reference's on the form's own logits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from form_runs import form_for
from image_bundle import CODEBOOK, export_c2i

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
def c2i(tmp_path_factory):
    return export_c2i(tmp_path_factory.mktemp("c2i"))[1]


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
    backend = (backend_type or backends)(ort_session(built.model),
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
    token's position as offset, the linear schedule's scale; image 0 = the ORT run's."""
    calls = []

    class Recording(backends):
        def run(self, feeds):
            out = super().run(feeds)
            calls.append(({k: np.array(v) for k, v in feeds.items()
                           if k in ("sampling_params", "seed", "offset")}, out))
            return out

    engine = _engine(c2i, ort_session, backends, backend_type=Recording)
    got = generate_images(engine, LABELS, SEEDED).tokens
    assert len(calls) == 16
    for k, (feeds, out) in enumerate(calls):
        assert feeds["seed"].tolist() == [11, 12, 13] and feeds["offset"].tolist() == [1 + k] * 3
        assert feeds["sampling_params"][0, 4] == pytest.approx(SEEDED.scale_at(k, 16))
        want = sample_reference(out["last_logits"][:, :CODEBOOK], feeds["sampling_params"],
                                np.zeros((3, CODEBOOK), bool), feeds["seed"], feeds["offset"])
        np.testing.assert_array_equal(out["token_ids"], want)
    np.testing.assert_array_equal(got[0], _ort(c2i, LABELS, SEEDED)[0])  # drawn as row 0 both
    again = generate_images(_engine(c2i, ort_session, backends), LABELS, SEEDED).tokens
    np.testing.assert_array_equal(got, again)


def test_sampler_feeds_are_per_image(c2i):
    form = form_for(c2i, max_seq_len=S_MAX)
    io = {t.name: t.shape for t in form.stage.inputs}
    assert io["sampling_params"] == ("images", 5) and io["presence"] == ("images", CODEBOOK)
    assert io["input_ids"][0] != "images"
    node = next(n for n in form.model.graph.node if n.op_type == "sample")
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
