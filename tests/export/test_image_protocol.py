"""Image-token protocol: a LlamaGen-shaped module exports to a multi-stage bundle on the fast path.

decoder (in place, GroupQueryAttention per layer) + vq_decoder (tokens -> pixels), pipeline
"image-tokens" over the codebook token space with its grid, and the module's 2D RoPE as the
LlamaGen paper's code defines it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from image_bundle import CLASSES, CODEBOOK, GRID

from arx.errors import ArxError
from arx.export.exporter import ExportOptions, export_model
from arx.export.image_modules import ClassToImageDecoder, rope_2d_table
from arx.manifest import read_manifest
from arx.runtime.image_generate import decode_pixels, image_info


@pytest.fixture(scope="module")
def c2i(c2i_export):
    return c2i_export


def test_bundle_has_decoder_vq_decoder_and_image_pipeline(c2i):
    module, bundle = c2i
    m = read_manifest(bundle)
    assert set(m.stages) == {"decoder", "decoder_step", "vq_decoder"}
    assert m.pipeline.kind == "image-tokens" and m.pipeline.token_space == "image"
    assert [(t.stage, t.inputs) for t in m.pipeline.then] == [("vq_decoder", {"tokens": "loop.tokens"})]
    space = m.token_spaces["image"]
    assert (space.kind, space.size, space.shape) == ("codebook", CODEBOOK, (GRID, GRID))
    assert m.decoder.token_space == m.stages["vq_decoder"].token_space == "image"
    assert m.kv.update == "in_place" and m.model["attention"]["path"] == "in_place"
    assert m.parity["passed"]
    info = image_info(m)
    assert (info.num_classes, info.null_class, info.class_offset) == (CLASSES, CLASSES, CODEBOOK)
    assert m.stages["vq_decoder"].outputs[0].shape == ("batch_size", 3, 8, 8)
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == len(module.layers)
    # the VQ decoder's weights live in its own stage, not in the decoder
    assert not any("vq" in t.name or "post_quant" in t.name for t in graph.initializer)


def test_vq_decoder_stage_pixels_match_the_module(c2i):
    module, bundle = c2i
    m = read_manifest(bundle)
    tokens = np.random.default_rng(3).integers(0, CODEBOOK, (4, GRID, GRID))
    got = decode_pixels(bundle, image_info(m), m, tokens)
    with torch.no_grad():
        ref = module.vq(torch.from_numpy(tokens.reshape(4, -1))).numpy()
    assert got.shape == ref.shape == (4, 3, 8, 8)
    np.testing.assert_allclose(got, ref, atol=1e-5)  # stated tolerance: 1e-5 on ~[-1, 1]
    assert m.extensions["image"]["vq_parity"]["max_abs_err"] <= 1e-4


def test_rope_2d_table_is_llamagen_s():
    """Zero prefix rows; pairs m < D/4 rotate by the row index, the rest by the column, with
    frequencies base^(-4m/D) (LlamaGen's precompute_freqs_cis_2d)."""
    d, g = 16, 3
    table = rope_2d_table(g, d, prefix=1).numpy()
    assert table.shape == (1 + g * g, d // 2, 2) and not table[0].any()
    freqs = 10000.0 ** (-4.0 * np.arange(d // 4) / d)
    for r in range(g):
        for c in range(g):
            angle = np.concatenate([r * freqs, c * freqs])
            np.testing.assert_allclose(table[1 + r * g + c, :, 0], np.cos(angle), atol=1e-6)
            np.testing.assert_allclose(table[1 + r * g + c, :, 1], np.sin(angle), atol=1e-6)


def test_module_without_its_vq_decoder_is_refused(tmp_path):
    module = ClassToImageDecoder(num_classes=2, codebook=16, grid=2).eval()
    module.arx_image = dict(module.arx_image, vq_decoder="missing")
    torch.save(module, tmp_path / "model.pt")
    with pytest.raises(ArxError, match="is not an nn.Module"):
        export_model(source=tmp_path / "model.pt", output=tmp_path / "o.arx",
                     options=ExportOptions(progress=False))
    assert not (tmp_path / "o.arx").exists()
