"""The manifest: stages with their own KV layouts, token spaces, the pipeline; format 1 bundles."""

from __future__ import annotations

import json

import pytest

from arx.errors import ArxError
from arx.manifest import (KVLayout, Manifest, Pipeline, PipelineStep, Stage, TensorSpec,
                          TokenizerInfo, TokenSpace, read_manifest)

KV = KVLayout(layers=2, kv_heads=2, head_dim=16, max_seq_len=64)


def decoder_stage(**kw) -> Stage:
    inputs = (TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),
              TensorSpec("attention_mask", "int64", ("batch_size", "total_sequence_length")))
    outputs = (TensorSpec("logits", "float32", ("batch_size", "logits_length", 100)),)
    return Stage("decoder.onnx", inputs, outputs, **kw)


def image_manifest() -> Manifest:
    """Two stages: a decoder over an image codebook, then a VQ decoder from tokens to pixels."""
    vq = Stage("vq_decoder.onnx", (TensorSpec("tokens", "int64", ("batch_size", 576)),),
               (TensorSpec("pixels", "float32", ("batch_size", 3, 384, 384)),), token_space="image")
    return Manifest(
        family="janus", vocab_size=100, tokenizer=TokenizerInfo("tokenizer.json"),
        stages={"decoder": decoder_stage(kv=KV, token_space="image"), "vq_decoder": vq},
        token_spaces={"text": TokenSpace("text", 100), "image": TokenSpace("codebook", 16384, (24, 24))},
        pipeline=Pipeline(kind="image-tokens", token_space="image",
                          then=(PipelineStep("vq_decoder", {"tokens": "loop.tokens"}),)))


def test_multi_stage_manifest_round_trips(tmp_path):
    m = image_manifest()
    m.write(tmp_path)
    back = read_manifest(tmp_path)
    assert back.to_json() == m.to_json()
    assert back.kv == KV and back.stages["vq_decoder"].kv is None
    assert back.token_spaces["image"] == TokenSpace("codebook", 16384, (24, 24))
    assert back.pipeline.then[0] == PipelineStep("vq_decoder", {"tokens": "loop.tokens"})


def test_text_bundle_is_a_one_stage_pipeline():
    m = Manifest(family="llama", vocab_size=100, tokenizer=TokenizerInfo(None),
                 stages={"decoder": decoder_stage(kv=KV, token_space="text")})
    assert m.pipeline == Pipeline() and m.token_spaces == {"text": TokenSpace("text", 100)}
    assert m.decoder is m.stages["decoder"] and m.kv == KV


@pytest.mark.parametrize("pipeline, what", [
    (Pipeline(loop="encoder"), "loop stage 'encoder'"),
    (Pipeline(samples="hidden"), "lacks output 'hidden'"),
    (Pipeline(token_space="audio"), "token space 'audio'"),
    (Pipeline(then=(PipelineStep("vq_decoder", {}),)), "stage 'vq_decoder'"),
])
def test_inconsistent_pipeline_is_refused(pipeline, what):
    with pytest.raises(ArxError, match=what):
        Manifest(family="llama", vocab_size=100, tokenizer=TokenizerInfo(None),
                 stages={"decoder": decoder_stage(kv=KV)}, pipeline=pipeline)


def format1(m: Manifest) -> dict:
    """What arx wrote before stages had their own KV layout (format_version 1)."""
    d = m.to_json()
    d["format_version"] = 1
    d["kv"] = d["stages"]["decoder"].pop("kv")
    d["stages"]["decoder"].pop("token_space")
    for key in ("token_spaces", "pipeline", "builds"):
        d.pop(key)
    d["builds"] = {"orin": {"kind": "kit", "path": "kits/orin"}}  # an extension key then
    return d


def test_format_1_bundle_loads_unchanged(tmp_path):
    m = Manifest(family="llama", vocab_size=100, tokenizer=TokenizerInfo(None),
                 stages={"decoder": decoder_stage(kv=KV, token_space="text")})
    (tmp_path / "arx.json").write_text(json.dumps(format1(m)))
    old = read_manifest(tmp_path)
    assert old.kv == KV and old.decoder.inputs == m.decoder.inputs
    assert old.pipeline == Pipeline() and old.builds["orin"]["kind"] == "kit"
    assert "kv" not in old.extensions and old.to_json()["format_version"] == 2


def test_newer_format_and_broken_manifest_say_what_to_do(tmp_path):
    m = image_manifest().to_json()
    (tmp_path / "arx.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ArxError, match="upgrade arx"):
        read_manifest(tmp_path)
    del m["stages"]["decoder"]["inputs"]
    (tmp_path / "arx.json").write_text(json.dumps(m))
    with pytest.raises(ArxError, match="re-export the bundle"):
        read_manifest(tmp_path)
