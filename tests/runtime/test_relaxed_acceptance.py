"""LANTERN's relaxed acceptance of Jacobi guesses (runtime/relaxed_acceptance.py) on the embedded
image model, models/arx-digits (64 codes of 8 dimensions, unit-normalised by its VQ decoder),
and on hand-made VQ decoder graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from arx.cli import main
from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.runtime import relaxed_acceptance as ra
from arx.runtime.decoder import DecoderSession
from arx.runtime.image_generate import ImageOptions, generate_images, image_info
from arx.runtime.image_speculative import generate_images_jacobi
from arx.runtime.sampler import SamplingOptions

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "arx-digits"


@pytest.fixture(scope="module")
def session():
    with DecoderSession(BUNDLE) as s:
        yield s


def _relaxation(k: int, delta: float) -> ra.Relaxation:
    manifest = read_manifest(BUNDLE)
    return ra.relaxation_for(BUNDLE, manifest, image_info(manifest), k, delta)


def test_target_moves_nearest_mass_up_to_delta():
    neighbours = np.array([[1, 2, 3], [0, 2, 3], [1, 3, 0], [2, 1, 0]])
    relax = ra.Relaxation(3, 0.25, neighbours)
    p = np.array([0.4, 0.1, 0.12, 0.38])
    out = relax.target(p, 0)  # 0.1 (code 1), then 0.1 + 0.12 = 0.22 <= 0.25, then 0.6: stop
    np.testing.assert_allclose(out, [0.62, 0.0, 0.0, 0.38])
    assert 0.5 * np.abs(out - p).sum() <= relax.delta + 1e-12
    np.testing.assert_allclose(relax.target(p, 3), [0.4, 0.0, 0.0, 0.6])  # codes 2, then 1
    np.testing.assert_array_equal(p, [0.4, 0.1, 0.12, 0.38])  # not changed in place
    tight = ra.Relaxation(3, 0.05, neighbours)  # not even the nearest fits: p itself
    assert tight.target(p, 3) is p


def test_nearest_codes_match_brute_force(monkeypatch):
    monkeypatch.setattr(ra, "CHUNK", 7)  # several blocks, one ragged
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 4)).astype(np.float32)
    near = ra.nearest_codes(vectors, 5)
    dist = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_array_equal(near, np.argsort(dist, axis=1, kind="stable")[:, :5])


def test_digits_codebook_is_the_unit_normalised_table():
    manifest = read_manifest(BUNDLE)
    vectors = ra.codebook_vectors(BUNDLE, manifest, "vq_decoder")
    model = onnx.load(str(BUNDLE / "vq_decoder.onnx"))
    table = next(numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.name == "embedding.weight")
    assert vectors.shape == (64, 8)
    np.testing.assert_allclose(vectors, table / np.linalg.norm(table, axis=1, keepdims=True),
                               rtol=1e-6)


def _vq_graph(tmp_path: Path, normalise: bool) -> tuple[Path, np.ndarray]:
    """tokens (B, 4) -> Reshape (B*4,) -> Gather(codebook) [-> LpNormalization] -> Identity."""
    table = np.arange(12, dtype=np.float32).reshape(6, 2) + 1.0
    nodes = [helper.make_node("Reshape", ["tokens", "flat"], ["ids"]),
             helper.make_node("Gather", ["codebook", "ids"], ["vectors"], axis=0)]
    last = "vectors"
    if normalise:
        nodes.append(helper.make_node("LpNormalization", ["vectors"], ["unit"], axis=-1, p=2))
        last = "unit"
    nodes.append(helper.make_node("Identity", [last], ["pixels"]))
    graph = helper.make_graph(
        nodes, "vq", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["b", 4])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "codebook"),
         numpy_helper.from_array(np.array([-1], np.int64), "flat")])
    path = tmp_path / "vq.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="vq.onnx.data", size_threshold=0)
    return path, table


class _Stage:
    def __init__(self, file: str):
        self.file = file
        self.inputs = [type("Input", (), {"name": "tokens"})()]


@pytest.mark.parametrize("normalise", [False, True])
def test_codebook_found_through_reshape_in_external_data(tmp_path, normalise):
    path, table = _vq_graph(tmp_path, normalise)
    manifest = type("Manifest", (), {"stages": {"vq_decoder": _Stage(path.name)}})()
    vectors = ra.codebook_vectors(tmp_path, manifest, "vq_decoder")
    want = table / np.linalg.norm(table, axis=1, keepdims=True) if normalise else table
    np.testing.assert_allclose(vectors, want, rtol=1e-6)


def _options(**sampling) -> ImageOptions:
    return ImageOptions(cfg_scale=3.0, sampling=SamplingOptions(**sampling))


def test_no_mass_moved_is_the_exact_rule(session):
    """delta below every neighbour's probability: the relaxed run is the exact one, greedy
    (= plain greedy) and sampled (the same seeded draws)."""
    relax = _relaxation(4, 1e-12)
    greedy = _options(do_sample=False)
    np.testing.assert_array_equal(
        generate_images_jacobi(session, [0, 3, 7], greedy, 4, relax).tokens,
        generate_images(session, [0, 3, 7], greedy).tokens)
    sampled = _options(do_sample=True, top_k=8, seed=5)
    np.testing.assert_array_equal(
        generate_images_jacobi(session, [1, 8], sampled, 6, relax).tokens,
        generate_images_jacobi(session, [1, 8], sampled, 6).tokens)


def test_relaxation_keeps_more_guesses(session):
    """The same seeds, exact against relaxed: more of the guesses are kept, and more tokens
    come out of each target step (40 images, fixed seeds: deterministic)."""
    classes = [i % 10 for i in range(40)]
    stats = {}
    for name, relax in (("exact", None), ("relaxed", _relaxation(16, 0.6))):
        runs = [generate_images_jacobi(session, classes[s: s + 8],
                                       _options(do_sample=True, top_k=8, seed=100 + s), 8,
                                       relax).speculation
                for s in range(0, 40, 8)]
        stats[name] = (sum(r.accepted for r in runs) / sum(r.proposed for r in runs),
                       sum(r.produced for r in runs) / sum(r.row_steps for r in runs))
    assert stats["relaxed"][0] > stats["exact"][0]
    assert stats["relaxed"][1] > stats["exact"][1]


def test_cli_reports_the_relaxation(tmp_path, capsys):
    out = tmp_path / "seven.png"
    assert main(["generate", str(BUNDLE), "--class", "7", "--image", str(out), "--json",
                 "--speculate", "jacobi:4", "--relax", "8,0.3", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file()
    assert report["speculation"]["relaxed"] == {"method": "lantern", "k": 8, "delta": 0.3}


@pytest.mark.parametrize("flags, fragment", [
    (["--relax", "8,0.3"], "add --speculate jacobi"),
    (["--speculate", "jacobi", "--relax", "64,0.3"], "below the codebook's 64 codes"),
    (["--speculate", "jacobi", "--relax", "8"], "takes K,DELTA"),
    (["--speculate", "jacobi", "--relax", "8,1.5"], "0 < DELTA <= 1"),
    (["--speculate", "jacobi", "--relax", "0,0.5"], "K >= 1"),
])
def test_cli_refuses_bad_relaxations(flags, fragment, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", str(BUNDLE), "--class", "7", "--image", str(out), *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_parse_relax():
    assert ra.parse_relax(None) is None
    assert ra.parse_relax("8,0.25") == (8, 0.25)
    with pytest.raises(ArxError):
        ra.parse_relax("x,0.1")
