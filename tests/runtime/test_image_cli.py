"""arx generate BUNDLE --class N --image out.png: PNGs, --json, and bad input in one line."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from image_bundle import GRID

from arx.cli import main
from arx.runtime.decoder import DecoderSession
from arx.runtime.image_generate import ImageOptions, generate_images
from arx.runtime.sampler import SamplingOptions


@pytest.fixture(scope="module")
def bundle(c2i_export):
    return c2i_export[1]


def _cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _png(path) -> np.ndarray:
    """Decode the PNGs arx writes (8-bit, filter 0, one IDAT) -> (H, W, C) uint8."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3}[color]
    idat = data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    assert depth == 8 and not raw[:, 0].any()
    return raw[:, 1:].reshape(h, w, channels)


def test_batch_writes_a_grid_and_json_has_the_token_grids(bundle, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, err = _cli(capsys, bundle, "--class", 2, "--batch", 4, "--cfg", 3,
                             "--seed", 9, "--top-k", 30, "--image", out, "--json", "--zoom", 2)
    assert code == 0, err
    report = json.loads(stdout)
    with DecoderSession(bundle) as session:
        ref = generate_images(session, [2] * 4, ImageOptions(cfg_scale=3.0, sampling=SamplingOptions(
            do_sample=True, top_k=30, seed=9)))
    assert [i["tokens"] for i in report["images"]] == ref.tokens.tolist()
    assert [i["seed"] for i in report["images"]] == [9, 10, 11, 12]
    assert report["grid"] == [GRID, GRID] and report["time_to_first_image_token_s"] > 0
    image = _png(out)  # 2 x 2 images of 8 x 8 pixels with a 1-pixel gap, zoomed 2x
    assert image.shape == (2 * 17, 2 * 17, 3)
    assert "4 images of 16 tokens" in err


def test_one_file_per_image_and_greedy_is_repeatable(bundle, tmp_path, capsys):
    pattern = tmp_path / "img-{i}.png"
    for _ in range(2):
        code, _, err = _cli(capsys, bundle, "--class", 1, "--class", 4, "--greedy",
                            "--image", pattern, "--zoom", 1)
        assert code == 0, err
        first = [_png(tmp_path / f"img-{i}.png") for i in range(2)]
    assert [p.shape for p in first] == [(8, 8, 3)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0.png", "img-1.png"]


@pytest.mark.parametrize("args, fragment", [
    (["--class", 5], "outside the bundle's 5 classes (0..4)"),
    (["--class", -1], "outside the bundle's 5 classes"),
    (["--class", 1, "--cfg", -2], "--cfg must be >= 0"),
    (["--class", 1, "--cfg-schedule", "linear", "--batch", 0], "--batch and --zoom must be >= 1"),
    (["--prompt", "a cat"], "is class-conditional: give --class N"),
    (["--class", 1, "--max-new-tokens", 4, "--no-eos-stop"],
     "--max-new-tokens, --no-eos-stop do not apply to an image-token bundle"),
])
def test_bad_input_is_one_line_and_writes_nothing(bundle, tmp_path, capsys, args, fragment):
    out = tmp_path / "x.png"
    code, stdout, err = _cli(capsys, bundle, *args, "--image", out)
    assert code == 2 and stdout == "" and err.splitlines() == [err.strip()], err
    assert err.startswith("arx: error: ") and fragment in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, fragment", [("missing/x.png", "does not exist"),
                                             ("folder", "is a folder"),
                                             ("x.jpg", "must name a .png file")])
def test_unwritable_image_path_is_refused_before_the_loop(bundle, tmp_path, capsys, where,
                                                          fragment):
    (tmp_path / "folder").mkdir()
    code, stdout, err = _cli(capsys, bundle, "--class", 1, "--image", tmp_path / where)
    assert code == 2 and stdout == "" and fragment in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_image_on_a_text_bundle_is_refused(exported_bundle, tmp_path, capsys):
    text = exported_bundle("llama")
    capsys.readouterr()  # the fixture's export progress
    code, stdout, err = _cli(capsys, text, "--prompt-ids", "1,2",
                             "--image", tmp_path / "x.png")
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    assert "is a text-generation bundle, not an image-token one" in err
    code, _, err = _cli(capsys, text, "--class", 3, "--image", tmp_path / "x.png")
    assert code == 2 and "not an image-token one" in err
    assert list(tmp_path.iterdir()) == []


def test_arx_build_kit_of_an_image_bundle_has_both_engines(bundle, tmp_path, capsys):
    """The kit builds the decoder and the VQ decoder (tests/builder/test_image_form.py checks
    the forms); --sampler argmax is refused in one line, writing nothing."""
    out = tmp_path / "kit"
    code = main(["build", str(bundle), "--target", "orin", "--kit", "--no-ptx", "--sampler",
                 "argmax", "-o", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arx: error:")]
    assert code == 2 and len(lines) == 1 and "--sampler plugin" in lines[0] and not out.exists()
    assert main(["build", str(bundle), "--target", "orin", "--kit", "--no-ptx", "-o", str(out)]) == 0
    kit = json.loads((out / "kit.json").read_text())
    assert [s["engine"] for s in kit["stages"]] == ["decoder.engine", "vq_decoder.engine"]
