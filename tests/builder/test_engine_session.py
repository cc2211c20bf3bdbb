"""The generation loop on an engine session (runtime/engine_session.py), on the TensorRT form.

The backend here is ONNX Runtime running the TensorRT-form graph through IO binding, with the
cache buffers bound in place exactly as TensorRTBackend binds them (present.i.* -> the address of
past_key_values.i.*): the loop, its feeds (fixed-width decode mask, sampler inputs, seeds and
offsets) and the form are checked together against `arx generate`'s own loop on the bundle.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from form_runs import form_for

from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.engine_session import EngineSession
from arx.runtime.generate import GenerateOptions, generate
from arx.runtime.sampler import SamplingOptions

S_MAX = 48
PROMPTS = [[1, 17, 33, 99, 5, 12, 80, 7, 9], [1, 64, 3], [2, 40, 41, 42, 43]]
NATIVE = {"attention": "native", "sampler": "argmax"}


class OrtFormBackend:
    """allocate/run like TensorRTBackend, on ONNX Runtime; aliased outputs write in place."""

    def __init__(self, session: ort.InferenceSession, aliases: dict[str, str]):
        self.session, self.aliases = session, aliases
        self.outputs = [o.name for o in session.get_outputs()]

    def allocate(self, shape, dtype):
        self.live = getattr(self, "live", 0) + 1
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.dtype(dtype)))

    def release(self, buffer):
        self.live -= 1

    def run(self, feeds):
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        returned = [o for o in self.outputs if o not in self.aliases]
        for name in returned:  # bound first: get_outputs() follows the binding order
            binding.bind_output(name)
        for name in self.outputs:
            if name in self.aliases:
                binding.bind_ortvalue_output(name, feeds[self.aliases[name]])
        self.session.run_with_iobinding(binding)
        return {n: v.numpy() for n, v in zip(returned, binding.get_outputs())}


def engine_for(bundle, ort_session, max_batch=4, **kw) -> EngineSession:
    m = read_manifest(bundle)
    form = form_for(bundle, max_seq_len=S_MAX, max_batch=max_batch, **kw)
    report = {"io": form.stage.to_json(), "max_seq_len": S_MAX, "max_batch": max_batch}
    aliases = {present: past for past, present in m.kv.pairs()}
    return EngineSession(OrtFormBackend(ort_session(form.proto), aliases), report, m)


def ort_generate(bundle, prompts, options):
    with DecoderSession(bundle) as session:
        return generate(session, prompts, options)


GREEDY = GenerateOptions(max_new_tokens=12, stop_on_eos=False)


def test_greedy_on_native_engine_equals_ort_generate(family, exported_bundle, ort_session):
    bundle = exported_bundle(family)
    want = ort_generate(bundle, PROMPTS, GREEDY).tokens
    got = generate(engine_for(bundle, ort_session, **NATIVE), PROMPTS, GREEDY)
    assert got.tokens == want and len(got.step_s) == GREEDY.max_new_tokens - 1


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_greedy_on_plugin_engine_equals_ort_generate(family_name, exported_bundle, ort_session):
    """The plugin form (arx::kv_attention + arx::sample as their NumPy references)."""
    bundle = exported_bundle(family_name)
    want = ort_generate(bundle, PROMPTS, GREEDY).tokens
    assert generate(engine_for(bundle, ort_session), PROMPTS, GREEDY).tokens == want


def test_device_sampling_is_seeded(exported_bundle, ort_session):
    """arx::sample draws from (seed, offset): the same seed gives the same tokens, another seed
    other tokens, and top_k = 1 is greedy."""
    bundle = exported_bundle("qwen2")
    engine = engine_for(bundle, ort_session)

    def run(**kw):
        o = GenerateOptions(max_new_tokens=12, stop_on_eos=False,
                            sampling=SamplingOptions(do_sample=True, **kw))
        return generate(engine, PROMPTS, o).tokens

    a, b = run(seed=1, temperature=1.5), run(seed=1, temperature=1.5)
    assert a == b and a != run(seed=2, temperature=1.5)
    assert run(seed=5, top_k=1) == ort_generate(bundle, PROMPTS, GREEDY).tokens
    # presence reaches the sampler: greedy with a repetition penalty leaves the greedy loop
    penalized = GenerateOptions(max_new_tokens=12, stop_on_eos=False,
                                sampling=SamplingOptions(repetition_penalty=5.0))
    got = generate(engine, PROMPTS, penalized).tokens
    assert got == ort_generate(bundle, PROMPTS, penalized).tokens
    assert got != ort_generate(bundle, PROMPTS, GREEDY).tokens


@pytest.mark.parametrize("kw", [dict(temperature=1.5), dict(temperature=0.9, top_k=20, top_p=0.8),
                                dict(temperature=1.2, repetition_penalty=1.5)])
def test_same_seed_same_tokens_on_ort_and_the_engine(exported_bundle, ort_session, kw):
    """One sampling definition: the host sampler on ORT and arx::sample in the TensorRT form
    draw the same tokens for the same seed (offsets count positions on both)."""
    bundle = exported_bundle("llama")
    o = GenerateOptions(max_new_tokens=12, stop_on_eos=False,
                        sampling=SamplingOptions(do_sample=True, seed=11, **kw))
    engine = engine_for(bundle, ort_session)
    got = generate(engine, PROMPTS, o)
    assert got.tokens == ort_generate(bundle, PROMPTS, o).tokens
    assert engine.backend.live == 0  # the cache and presence buffers were released


def test_host_sampling_on_argmax_engine_equals_ort_generate(exported_bundle, ort_session):
    """An ArgMax engine asked to sample: the host sampler on last_logits, as `arx generate`."""
    bundle = exported_bundle("llama")
    o = GenerateOptions(max_new_tokens=10, stop_on_eos=False,
                        sampling=SamplingOptions(do_sample=True, temperature=0.8, top_p=0.9,
                                                 repetition_penalty=1.1, seed=3))
    got = generate(engine_for(bundle, ort_session, **NATIVE), PROMPTS, o)
    assert got.tokens == ort_generate(bundle, PROMPTS, o).tokens


def test_engine_loop_refuses_what_the_engine_cannot_do(exported_bundle, ort_session):
    bundle = exported_bundle("llama")
    engine = engine_for(bundle, ort_session, max_batch=2, logits="none", **NATIVE)
    with pytest.raises(ArxError, match="engine's static cache of 48"):
        generate(engine, [[1] * 40], GenerateOptions(max_new_tokens=10))
    with pytest.raises(ArxError, match="max batch of 2"):
        generate(engine, PROMPTS, GREEDY)
    sample = GenerateOptions(max_new_tokens=8, sampling=SamplingOptions(do_sample=True))
    with pytest.raises(ArxError, match="greedy token ids only"):
        generate(engine, PROMPTS[:2], sample)


@pytest.fixture
def engine_cli(monkeypatch, exported_bundle, ort_session):
    """`arx generate/profile --engine h100` with open_engine serving the ORT-run TensorRT form."""
    from contextlib import contextmanager

    from arx.runtime import engine_session

    def use(family, **kw):
        bundle = exported_bundle(family)

        @contextmanager
        def fake_open(path, target):
            assert str(path) == str(bundle) and target == "h100"
            yield engine_for(bundle, ort_session, **kw)

        monkeypatch.setattr(engine_session, "open_engine", fake_open)
        return bundle

    return use


def test_cli_generate(engine_cli, capsys):
    import json

    from arx.cli import main

    bundle = engine_cli("qwen3", **NATIVE)
    args = ["generate", str(bundle), "--prompt-ids", "1,17,33", "--prompt-ids", "1,64",
            "--max-new-tokens", "8", "--greedy", "--no-eos-stop", "--json"]
    assert main(args + ["--engine", "h100"]) == 0
    on_engine = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    on_ort = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in on_engine["sequences"]] == [s["tokens"] for s in on_ort["sequences"]]


def test_cli_profile_on_engine(engine_cli, tmp_path, capsys):
    import json

    from arx.cli import main

    bundle = engine_cli("llama")
    out = tmp_path / "profile.json"
    assert main(["profile", str(bundle), "--engine", "h100", "--prompt-len", "5", "--gen-len", "4",
                 "--batch", "1,2", "--runs", "2", "--warmup", "0", "--json", str(out),
                 "--quiet"]) == 0
    assert "tensorrt:h100" in capsys.readouterr().out
    report = json.loads(out.read_text())["bundles"][0]
    assert report["device"] == "tensorrt:h100" and len(report["results"]) == 2
    for r in report["results"]:
        assert r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["runs"]) == 2
        assert r["roofline"] is None and not any(r["op_breakdown"].values())
