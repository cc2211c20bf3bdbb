"""Speculative decoding on an engine session: the TensorRT form built with --logits all verifies
k + 1 tokens per step (ragged, after a past, batch 3), run by ONNX Runtime with the cache bound
in place (test_engine_session.py's backend). The verify rows are sampled on the host by the
same definition, so greedy and seeded sampling give the tokens they give on ORT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.runtime.generate import GenerateOptions
from arx.runtime.proposers import open_proposer
from arx.runtime.sampler import SamplingOptions
from arx.runtime.speculative import SpeculativeOptions, generate_speculative


@pytest.fixture(scope="module")
def engines():
    """test_engine_session.py's engine_for / ort_generate / PROMPTS (one backend for the ORT-run
    form, not a copy of it)."""
    path = Path(__file__).with_name("test_engine_session.py")
    spec = importlib.util.spec_from_file_location("arx_test_engine_session", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _speculate(session, bundle, prompts, options, spec, **proposer):
    with open_proposer(read_manifest(bundle), bundle, **proposer) as p:
        return generate_speculative(session, p, prompts, options, spec)


@pytest.mark.parametrize("form", [{}, {"attention": "native", "sampler": "argmax"}],
                         ids=["plugins", "native"])
@pytest.mark.parametrize("k", ["2", "auto"])
def test_greedy_verify_on_the_engine_is_plain_greedy(form, k, exported_bundle, ort_session,
                                                     engines):
    bundle = exported_bundle("llama")
    engine = engines.engine_for(bundle, ort_session, logits="all", **form)
    prompts, greedy = engines.PROMPTS, engines.GREEDY  # 3 ragged prompts, 12 tokens
    want = engines.ort_generate(bundle, prompts, greedy).tokens
    spec = SpeculativeOptions.parse(k)
    for proposer in ({"draft": bundle}, {"draft": exported_bundle("qwen2")}, {"lookup": 2}):
        got = _speculate(engine, bundle, prompts, greedy, spec, **proposer)
        assert got.tokens == want, proposer
    assert got.speculation.target_steps > 0
    assert engine.backend.live == 0  # the engine's cache buffers were released


def test_seeded_sampling_on_the_engine_equals_ort(exported_bundle, ort_session, engines):
    """The same seed gives the same speculative tokens on the engine form and on the bundle:
    the plugin form samples the prefill token on device, the verify rows on the host."""
    from arx.runtime.decoder import DecoderSession

    bundle = exported_bundle("llama")
    options = GenerateOptions(max_new_tokens=16, stop_on_eos=False,
                              sampling=SamplingOptions(do_sample=True, temperature=1.3,
                                                       top_k=40, seed=4))
    spec = SpeculativeOptions(k=3)
    engine = engines.engine_for(bundle, ort_session, logits="all")
    got = _speculate(engine, bundle, engines.PROMPTS, options, spec, draft=bundle)
    with DecoderSession(bundle) as session:
        want = _speculate(session, bundle, engines.PROMPTS, options, spec, draft=bundle)
    assert got.tokens == want.tokens
    assert got.speculation.accepted > 0


def test_an_engine_without_all_logits_is_refused(exported_bundle, ort_session, engines):
    bundle = exported_bundle("llama")
    engine = engines.engine_for(bundle, ort_session)  # --logits last
    with pytest.raises(ArxError, match="rebuild it with arx build --logits all"):
        _speculate(engine, bundle, engines.PROMPTS, engines.GREEDY, SpeculativeOptions(),
                   lookup=2)


@pytest.mark.parametrize("form", [{}, {"attention": "native", "sampler": "argmax"}],
                         ids=["plugins", "native"])
def test_device_verify_is_plain_greedy_without_logits(form, exported_bundle, ort_session,
                                                      engines):
    """--logits verify: the engine returns each position's ArgMax (verify_ids) and no logits;
    greedy proposals are checked against those ids, and the tokens are plain greedy's."""
    bundle = exported_bundle("llama")
    engine = engines.engine_for(bundle, ort_session, logits="verify", **form)
    assert "verify_ids" in engine.outputs and not {"logits", "last_logits"} & engine.outputs
    want = engines.ort_generate(bundle, engines.PROMPTS, engines.GREEDY).tokens
    for proposer in ({"draft": bundle}, {"lookup": 2}):
        got = _speculate(engine, bundle, engines.PROMPTS, engines.GREEDY,
                         SpeculativeOptions.parse("auto"), **proposer)
        assert got.tokens == want, proposer
        # the draft is the target itself: every proposal is the device's own argmax
        assert "draft" not in proposer or got.speculation.accepted > 0
    assert engine.backend.live == 0


def test_device_verify_ids_are_the_all_logits_argmax(exported_bundle, ort_session, engines):
    """One ragged verify step after a past: verify_ids equal the argmax of the --logits all
    engine's logits at every valid position."""
    import numpy as np

    bundle = exported_bundle("qwen2")
    ids = np.array([[5, 9, 11, 3], [7, 2, 0, 0], [4, 0, 0, 0]], np.int64)
    lens = np.array([4, 2, 1], np.int64)
    got, want = [], []
    for mode, out in (("verify", got), ("all", want)):
        engine = engines.engine_for(bundle, ort_session, logits=mode, sampler="argmax")
        cache = engine.new_cache(3)
        engine.step_tokens(cache, np.array([[1, 6, 8], [1, 6, 0], [1, 0, 0]]), np.array([3, 2, 1]))
        out.append(engine.step_verify(cache, ids, lens) if mode == "verify" else
                   engine.step(cache, ids, lens, logits="all").argmax(-1))
        cache.close()
    valid = np.arange(4)[None] < lens[:, None]
    np.testing.assert_array_equal(got[0][valid], want[0][valid])


@pytest.mark.parametrize("sampling, fragment", [
    ({"do_sample": True, "seed": 1}, "rebuild it with --logits all for sampled speculation"),
    ({"repetition_penalty": 1.2}, "without --repetition-penalty"),
])
def test_device_verify_refuses_what_its_argmax_cannot_judge(sampling, fragment, exported_bundle,
                                                            ort_session, engines):
    bundle = exported_bundle("llama")
    engine = engines.engine_for(bundle, ort_session, logits="verify")
    options = GenerateOptions(max_new_tokens=8, stop_on_eos=False,
                              sampling=SamplingOptions(**sampling))
    with pytest.raises(ArxError, match=fragment):
        _speculate(engine, bundle, engines.PROMPTS, options, SpeculativeOptions(), lookup=2)


def test_verify_needs_a_sampler_and_a_text_bundle():
    from arx.builder.image_form import check_image_form
    from arx.builder.options import BuildOptions

    with pytest.raises(ArxError, match="drop --logits verify or keep the sampler"):
        BuildOptions(target="h100", sampler="none", logits="verify")
    with pytest.raises(ArxError, match="an image-token engine takes --logits last"):
        check_image_form("plugin", "verify")
