"""`arx export --inputs-embeds`: a decoder that takes embeddings, with an embedder stage."""

from __future__ import annotations

import numpy as np
import pytest

from arx.errors import ArxError
from arx.export.exporter import ExportOptions, export_model
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate

PROMPTS = [[1, 17, 33, 99, 5, 12, 80], [1, 64, 3], [7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def embeds_bundle(hf_model_dir, tmp_path_factory):
    """family -> bundle exported with --inputs-embeds (llama: untied head; gpt2: tied)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"embeds-{family}") / f"{family}.arx"
            export_model(source=hf_model_dir(family)[0], output=out,
                         options=ExportOptions(progress=False, inputs_embeds=True))
            cache[family] = out
        return cache[family]

    return get


@pytest.mark.parametrize("family, shared", [("llama", False), ("gpt2", True)])
def test_manifest_and_files(embeds_bundle, family, shared):
    bundle = embeds_bundle(family)
    m = read_manifest(bundle)
    assert m.decoder.inputs[0].name == "inputs_embeds" and m.decoder.input("input_ids") is None
    assert m.pipeline.embed == "embedder" and m.pipeline.feedback == "inputs_embeds"
    assert m.stages["embedder"].kv is None and m.stages["embedder"].token_space == "text"
    assert m.parity["passed"] and "logits/step" in m.parity["outputs"]
    # a tied LM head keeps the table in the decoder: the embedder reads it from there
    assert (bundle / "embedder.onnx.data").exists() is not shared


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_equals_the_ids_bundle(embeds_bundle, exported_bundle, family):
    options = GenerateOptions(max_new_tokens=24, stop_on_eos=False)
    with DecoderSession(exported_bundle(family)) as ids, DecoderSession(embeds_bundle(family)) as emb:
        assert generate(emb, PROMPTS, options).tokens == generate(ids, PROMPTS, options).tokens


def test_embeddings_fed_directly(embeds_bundle, hf_model_dir):
    """Any embeddings go straight to the decoder: the model's own table gives the ids' logits,
    and a general step (ragged, after a past) takes embeddings too."""
    bundle = embeds_bundle("llama")
    table = hf_model_dir("llama")[1].get_input_embeddings().weight.detach().numpy()
    ids = np.array([[1, 17, 33, 99], [1, 64, 3, 0]])
    lens = np.array([4, 3])
    with DecoderSession(bundle) as s:
        a, b = s.new_cache(2, 16), s.new_cache(2, 16)
        want = s.step(a, ids, lens)
        got = s.step(b, None, lens, inputs_embeds=table[ids])
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        np.testing.assert_allclose(got[1, :3], want[1, :3], atol=1e-5)
        nxt = np.array([[5, 6], [7, 0]])
        want = s.step(a, nxt, np.array([2, 1]), logits="last")
        got = s.step(b, None, np.array([2, 1]), logits="last", inputs_embeds=table[nxt])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_build_refuses_in_one_line(embeds_bundle, tmp_path):
    from arx.builder.build import build_bundle
    from arx.builder.options import BuildOptions

    bundle = embeds_bundle("llama")
    with pytest.raises(ArxError, match="without --inputs-embeds"):
        build_bundle(bundle, BuildOptions(target="h100", kit=True, progress=False,
                                          output=str(tmp_path / "kit")))
    assert not (tmp_path / "kit").exists()


def test_weight_only_calibration_through_the_embedder(embeds_bundle, tmp_path):
    """arx calibrate --scheme w4 of an --inputs-embeds bundle: its samples reach the decoder
    through the embedder stage (gate and per-layer probes), and the quantized bundle generates
    through it too. w8a8 (its probes feed ids), and a tied table the embedder reads from the
    decoder's data file (which calibrate rewrites), are refused in one line."""
    from arx.calibration.calibrator import calibrate_bundle, check_source
    from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions

    def options(scheme):
        return CalibrateOptions(quant=QuantOptions(scheme=scheme, group_size=16), force=True,
                                data=DataOptions(random=True, samples=4, seq_len=24,
                                                 eval_samples=2), progress=False, plot=False)

    bundle = embeds_bundle("llama")
    result = calibrate_bundle(bundle=bundle, output=tmp_path / "w4.arx", options=options("w4"))
    acc = result.manifest.extensions["quantization"]["accuracy"]
    assert acc["tokens"] == 2 * 23 and 0 < acc["ppl_fp32"] < float("inf")
    # the probes ran the decoder on the embedder's output: w4's block error, not garbage
    assert result.report.layers and all(0 < e.err_out < 1 and e.added < 0.3 for e in result.report.layers)
    with DecoderSession(tmp_path / "w4.arx") as q, DecoderSession(bundle) as fp:
        got = generate(q, PROMPTS, GenerateOptions(max_new_tokens=8, stop_on_eos=False)).tokens
        want = generate(fp, PROMPTS, GenerateOptions(max_new_tokens=8, stop_on_eos=False)).tokens
    assert [len(t) for t in got] == [len(t) for t in want]
    with pytest.raises(ArxError, match="weight-only schemes"):
        check_source(bundle, read_manifest(bundle), activations=True)
    tied = embeds_bundle("gpt2")
    with pytest.raises(ArxError, match="reads the tied token table"):
        calibrate_bundle(bundle=tied, output=tmp_path / "tied.arx", options=options("w4"))
    assert not (tmp_path / "tied.arx").exists()
