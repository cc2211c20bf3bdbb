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
