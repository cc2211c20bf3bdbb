"""Janus bundles generate the image tokens transformers does (runtime/janus_generate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from janus_models import BOI, BOS, exported_janus, hf_image_tokens  # noqa: E402

from arx.runtime.decoder import DecoderSession  # noqa: E402
from arx.runtime.image_generate import ImageOptions  # noqa: E402
from arx.runtime.janus_generate import generate_images_from_prompts, prompt_rows  # noqa: E402
from arx.runtime.sampler import SamplingOptions  # noqa: E402

PROMPTS = [[BOS, 10, 11, 12, 13, BOI], [BOS, 20, 21, BOI]]  # ragged: HF left-pads, arx right-pads


def _generate(bundle, prompts, cfg, **sampling):
    options = ImageOptions(cfg_scale=cfg, sampling=SamplingOptions(**sampling))
    with DecoderSession(bundle) as session:
        return generate_images_from_prompts(session, prompts, options)


@pytest.mark.parametrize("shape", ["small", "wide"])
def test_greedy_cfg_tokens_equal_transformers_generate(shape, tmp_path_factory):
    _, bundle, model = exported_janus(shape, tmp_path_factory.getbasetemp())
    ref = hf_image_tokens(model, PROMPTS, cfg_scale=5.0)  # (2, N)
    got = _generate(bundle, PROMPTS, 5.0, do_sample=False).tokens.reshape(len(PROMPTS), -1)
    assert len(set(ref.ravel().tolist())) > 3  # the grids vary: a wrong feedback would show
    np.testing.assert_array_equal(got, ref)


def test_unconditional_rows_keep_bos_and_boi_only():
    cond = {"bos_token_id": BOS, "boi_token_id": BOI, "pad_token_id": 2}
    ids, lengths = prompt_rows(PROMPTS, cond, guided=True)
    assert lengths.tolist() == [6, 4, 6, 4]
    assert ids[2].tolist() == [BOS, 2, 2, 2, 2, BOI] and ids[3, :4].tolist() == [BOS, 2, 2, BOI]


def test_seeded_sampling_reproducible_and_independent_of_the_batch(tmp_path_factory):
    _, bundle, _ = exported_janus("small", tmp_path_factory.getbasetemp())
    kw = dict(do_sample=True, seed=3, top_k=8)
    a = _generate(bundle, PROMPTS, 4.0, **kw).tokens
    b = _generate(bundle, PROMPTS, 4.0, **kw).tokens
    alone = _generate(bundle, PROMPTS[:1], 4.0, **kw).tokens
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], alone[0])  # image 0 draws as if alone (seed 3)
    assert not np.array_equal(a, _generate(bundle, PROMPTS, 4.0, **{**kw, "seed": 4}).tokens)


def test_cli_prompt_ids_write_png_and_json(tmp_path_factory, tmp_path, capsys):
    from arx.cli import main

    _, bundle, _ = exported_janus("small", tmp_path_factory.getbasetemp())
    capsys.readouterr()  # the export's own progress lines, when this test exported first
    out = tmp_path / "apple.png"
    code = main(["generate", str(bundle), "--prompt-ids", "10,11,12,13", "--image", str(out),
                 "--cfg", "5", "--seed", "3", "--json"])
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = json.loads(capsys.readouterr().out)["images"][0]
    ref = _generate(bundle, [PROMPTS[0]], 5.0, do_sample=True, seed=3)  # BOS, BOI added
    assert image["prompt"] == "10,11,12,13" and image["tokens"] == ref.tokens[0].tolist()


def test_cli_class_on_text_bundle_is_one_line(tmp_path_factory, tmp_path, capsys):
    from arx.cli import main

    _, bundle, _ = exported_janus("small", tmp_path_factory.getbasetemp())
    capsys.readouterr()  # the export's own progress lines, when this test exported first
    out = tmp_path / "x.png"
    code = main(["generate", str(bundle), "--class", "3", "--image", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("arx: error:") and "--prompt" in err and "\n" not in err
    assert not out.exists()


def test_cli_prompt_text_through_the_bundle_tokenizer_equals_transformers(tmp_path, capsys):
    """--prompt TEXT: the bundle's tokenizer, BOS ... BOI framing, greedy CFG = transformers on
    the ids its tokenizer gives for TEXT followed by the image-start token."""
    from janus_models import save_tiny_janus
    from tokenizer_fixtures import make_llama
    from transformers import AutoTokenizer

    from arx.cli import main
    from arx.export.exporter import ExportOptions, export_model

    folder = tmp_path / "janus"
    model = save_tiny_janus(folder)
    make_llama(folder)
    export_model(source=folder, output=tmp_path / "j.arx", options=ExportOptions(progress=False))
    text = "The quick brown fox"
    ids = AutoTokenizer.from_pretrained(folder)(text).input_ids + [BOI]
    assert ids[0] == BOS
    ref = hf_image_tokens(model, [ids], cfg_scale=5.0)
    capsys.readouterr()
    code = main(["generate", str(tmp_path / "j.arx"), "--prompt", text, "--greedy", "--cfg", "5",
                 "--json"])
    image = json.loads(capsys.readouterr().out)["images"][0]
    assert code == 0 and image["prompt"] == text
    np.testing.assert_array_equal(np.array(image["tokens"]).ravel(), ref[0])


def test_cli_prompt_past_the_context_is_one_line(tmp_path_factory, tmp_path, capsys):
    from arx.cli import main
    from arx.manifest import read_manifest

    _, bundle, _ = exported_janus("small", tmp_path_factory.getbasetemp())
    context = read_manifest(bundle).kv.max_seq_len
    capsys.readouterr()
    out = tmp_path / "x.png"
    code = main(["generate", str(bundle), "--prompt-ids", ",".join(["10"] * context),
                 "--image", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("arx: error:") and "--max-seq-len" in err
    assert "\n" not in err and not out.exists()


def test_weight_only_calibration_of_a_janus_bundle_generates_images(tmp_path_factory, tmp_path):
    """arx calibrate --random --scheme w4 quantizes the decoder of a bundle that takes
    embeddings (random image tokens through its image_embed stage, for the gate and the
    per-layer probes); the quantized bundle draws CFG grids of the codebook's ids. w8a8 (its
    range probes feed ids) is refused in one line."""
    from arx.calibration.calibrator import calibrate_bundle
    from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
    from arx.errors import ArxError
    from arx.manifest import read_manifest

    _, bundle, _ = exported_janus("small", tmp_path_factory.getbasetemp())
    n = len(_generate(bundle, PROMPTS[:1], 5.0, do_sample=False).tokens.ravel())
    data = DataOptions(random=True, samples=4, seq_len=n, eval_samples=2)
    out = tmp_path / "w4.arx"
    result = calibrate_bundle(bundle=bundle, output=out, options=CalibrateOptions(
        quant=QuantOptions(scheme="w4", group_size=16), data=data, force=True,
        progress=False, plot=False))
    acc = result.manifest.extensions["quantization"]["accuracy"]
    assert acc["tokens"] > 0 and 0 <= acc["top1_agreement"] <= 1
    assert result.report.layers and all(e.err_out >= 0 for e in result.report.layers)
    grid = _generate(out, PROMPTS, 5.0, do_sample=False).tokens.reshape(len(PROMPTS), -1)
    fp32 = _generate(bundle, PROMPTS, 5.0, do_sample=False).tokens.reshape(len(PROMPTS), -1)
    assert grid.shape == fp32.shape and grid.min() >= 0
    assert grid.max() < read_manifest(out).vocab_size
    with pytest.raises(ArxError, match="weight-only schemes; use --scheme w8 or w4"):
        calibrate_bundle(bundle=bundle, output=tmp_path / "a8.arx", options=CalibrateOptions(
            quant=QuantOptions(scheme="w8a8"), data=data, force=True, progress=False, plot=False))
    assert not (tmp_path / "a8.arx").exists()
