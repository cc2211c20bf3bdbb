"""arx export of a Janus checkpoint folder: stages, pipeline, parity, VQ pixels (export/janus.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from janus_models import BOI, BOS, PAD, exported_janus, save_tiny_janus  # noqa: E402

from arx.errors import ArxError  # noqa: E402
from arx.manifest import read_manifest  # noqa: E402
from arx.runtime.image_generate import decode_pixels, image_info  # noqa: E402

PIXEL_ATOL = 1e-4  # float32 convs, ORT against PyTorch


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return exported_janus("small", tmp_path_factory.getbasetemp())


def test_bundle_stages_and_pipeline(small):
    _, bundle, model = small
    m = read_manifest(bundle)
    assert set(m.stages) == {"decoder", "decoder_step", "embedder", "image_embed", "vq_decoder"}
    p = m.pipeline
    assert (p.kind, p.feedback, p.embed, p.token_space) == ("image-tokens", "inputs_embeds",
                                                           "image_embed", "image")
    codebook = model.config.vq_config.num_embeddings
    assert m.decoder.output("logits").shape[-1] == codebook  # the generation head's logits
    assert m.token_spaces["text"].size == model.config.text_config.vocab_size
    cond = m.extensions["image"]["condition"]
    assert (cond["kind"], cond["bos_token_id"], cond["boi_token_id"], cond["pad_token_id"]) == \
        ("text", BOS, BOI, PAD)
    assert m.parity["passed"] is True and m.parity["outputs"]["logits/step"]["max_abs"] < 1e-3


def test_vq_decoder_pixels_match_decode_image_tokens(small):
    _, bundle, model = small
    m = read_manifest(bundle)
    info = image_info(m)
    tokens = np.random.default_rng(3).integers(
        0, model.config.vq_config.num_embeddings, (2, *info.grid)).astype(np.int64)
    got = decode_pixels(bundle, info, m, tokens)  # (B, C, H, W)
    with torch.no_grad():
        ref = model.decode_image_tokens(torch.from_numpy(tokens.reshape(2, -1))).numpy()
    assert m.extensions["image"]["pixels"]["layout"] == "NCHW"
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), ref, atol=PIXEL_ATOL, rtol=0)


def test_image_embed_stage_is_embedding_plus_aligner(small):
    from arx.runtime.backend import OrtBackend

    _, bundle, model = small
    ids = np.array([[0, 5, 7], [3, 3, 1]], np.int64)
    with OrtBackend(bundle / "image_embed.onnx") as b:
        got = b.run({"input_ids": ids})["inputs_embeds"]
    with torch.no_grad():
        ref = model.prepare_embeddings_for_image_generation(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_missing_image_start_token_is_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "janus"
    save_tiny_janus(folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.pop("generation_kwargs")
    (folder / "generation_config.json").write_text(json.dumps(gen))
    from arx.export.exporter import ExportOptions, export_model

    with pytest.raises(ArxError, match="boi_token_id"):
        export_model(source=folder, output=tmp_path / "out.arx", options=ExportOptions(progress=False))
    assert not (tmp_path / "out.arx").exists()
