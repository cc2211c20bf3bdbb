"""arx export --quantize w8|w4 (issue 15, item 3): each linear quantized as it is emitted gives
the bundle arx export + arx calibrate give (same nodes, same initializer bytes), calibrate's
manifest section, and the accuracy report and gate against the unquantized PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from arx.calibration.calibrator import calibrate_bundle
from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
from arx.errors import ArxError
from arx.export.exporter import ExportOptions, export_model
from arx.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "arx-tiny"  # the embedded default: trained, tied lm_head
BF16_SHAPE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _options(scheme: str, data: DataOptions, **kw) -> CalibrateOptions:
    return CalibrateOptions(quant=QuantOptions(scheme=scheme, group_size=kw.pop("group_size", 128)),
                            data=data, progress=False, plot=False, **kw)


def _both(src: Path, work: Path, scheme: str, data: DataOptions, **kw) -> tuple[Path, Path]:
    """(export + calibrate, export --quantize) bundles of `src`."""
    export_model(source=src, output=work / "fp32.arx", options=ExportOptions(progress=False))
    calibrated = work / "calibrated.arx"
    calibrate_bundle(bundle=work / "fp32.arx", output=calibrated,
                     options=_options(scheme, data, **kw))
    direct = work / "direct.arx"
    export_model(source=src, output=direct,
                 options=ExportOptions(progress=False, quantize=_options(scheme, data, **kw)))
    return calibrated, direct


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """arx-tiny through both paths, w4, on 40 lines of its held-out text (10 evaluated); the
    gate set to 0 with --force, so the direct path's forced write is covered too."""
    work = tmp_path_factory.mktemp("quantized-tiny")
    text = work / "text.txt"
    lines = (TINY / "eval.txt").read_text(encoding="utf-8").splitlines()[:40]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = DataOptions(path=str(text), seq_len=64)
    return _both(TINY, work, "w4", data, max_ppl_increase=0.0, force=True) + (data,)


def _graph(path: Path) -> tuple[list[bytes], dict]:
    model = onnx.load(str(path))
    tensors = {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
               for t in model.graph.initializer}
    return [n.SerializeToString() for n in model.graph.node], tensors


def _assert_same_graphs(calibrated: Path, direct: Path) -> None:
    """Same nodes in the same order, same initializers byte for byte. What differs: the
    initializers' order in the file (calibrate appends the quantized ones at the end, export
    writes each where it is emitted), so decoder.onnx.data's offsets and the step graph's
    sha256 in the manifest."""
    for file in ("decoder.onnx", "decoder_step.onnx"):
        nodes_c, tensors_c = _graph(calibrated / file)
        nodes_d, tensors_d = _graph(direct / file)
        assert nodes_c == nodes_d, file
        assert tensors_c.keys() == tensors_d.keys(), file
        assert [k for k in tensors_c if tensors_c[k] != tensors_d[k]] == [], file
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(direct / "decoder.onnx")).graph.node)


def _assert_same_section(calibrated: Path, direct: Path) -> None:
    qc = read_manifest(calibrated).extensions["quantization"]
    qd = read_manifest(direct).extensions["quantization"]
    assert qc.keys() == qd.keys() and qc["accuracy"].keys() == qd["accuracy"].keys()
    assert {k: v for k, v in qc.items() if k not in ("source", "accuracy")} == \
        {k: v for k, v in qd.items() if k not in ("source", "accuracy")}
    assert qd["source"]["checkpoint"] and qd["source"]["exported_directly"]
    for name in ("calibration.json", "reports/accuracy.json"):
        assert json.loads((calibrated / name).read_text()).keys() == \
            json.loads((direct / name).read_text()).keys(), name


def test_w4_of_the_tied_default_model_equals_calibrate(tiny_pair):
    calibrated, direct, _ = tiny_pair
    _assert_same_graphs(calibrated, direct)  # lm_head untied and quantized by both
    _assert_same_section(calibrated, direct)
    # w4's int4 embedding, both paths: it reads the tied head's codes, in place
    model = onnx.load(str(direct / "decoder.onnx"), load_external_data=False)
    (embed,) = [n for n in model.graph.node if "input_ids" in n.input]
    assert embed.op_type == "GatherBlockQuantized"
    (scales,) = [n for n in model.graph.node if n.output[0] == embed.input[2]]
    (head,) = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("lm_head")]
    assert embed.input[0] == head.input[1] and scales.input[0] == head.input[2]
    assert {t.name for t in model.graph.initializer} & {"embed_tokens.weight", "lm_head.weight"} == set()
    assert read_manifest(direct).extensions["quantization"]["embedding"] == \
        {"table": "embed_tokens.weight", "format": "GatherBlockQuantized", "bits": 4,
         "codes": "shared with lm_head"}
    assert json.loads((direct / "calibration.json").read_text())["weights"]["embedding"] == "int4"
    assert not (direct / "decoder.onnx.data").stat().st_size > \
        (calibrated / "decoder.onnx.data").stat().st_size + 4096 * 64  # alignment padding only


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_group_32_with_biases_and_an_untied_head_equals_calibrate(tmp_path, monkeypatch, scheme):
    from tiny_models import make_hf_model

    from arx.calibration import embedding_quant, weight_only

    # every linear quantized in column chunks (of 24: the last one short), as a 128k-vocabulary
    # LM head is: the stacked chunks must be calibrate's whole-weight bytes
    monkeypatch.setattr(weight_only, "COLUMNS", 24)
    monkeypatch.setattr(embedding_quant, "ROWS", 24)
    make_hf_model("qwen2", tmp_path / "qwen2")  # q/k/v biases, own lm_head
    data = DataOptions(random=True, samples=1, eval_samples=2, seq_len=16)
    calibrated, direct = _both(tmp_path / "qwen2", tmp_path, scheme, data, group_size=32)
    _assert_same_graphs(calibrated, direct)
    _assert_same_section(calibrated, direct)
    q = read_manifest(direct).extensions["quantization"]
    assert q["weight_bits"] == int(scheme[1]) and q["group_size"] == 32 and "lm_head" in q["quantized"]
    # w4: the untied table int4 with codes of its own (in row chunks, as 128k rows are)
    assert q["embedding"] == ("float" if scheme == "w8" else {
        "table": "embed_tokens.weight", "format": "GatherBlockQuantized", "bits": 4, "codes": "own"})


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_quantizer_in_column_chunks_is_the_whole_weights_quantization(monkeypatch, bits):
    from arx.calibration import weight_only

    rng = np.random.default_rng(0)
    table = rng.standard_normal((37, 80)).astype(np.float32)  # (V, H): the tied head's table
    node = onnx.helper.make_node("MatMul", ["x", "lm_head.weight"], ["y"], name="lm_head")
    q = weight_only.LinearQuantizer(bits=bits, group_size=32, accuracy_level=0)
    whole_nodes, whole = q.quantize(node, table.T)
    monkeypatch.setattr(weight_only, "COLUMNS", 8)  # 37 columns: 4 chunks of 8 and one of 5
    nodes, chunked = q.quantize(node, table.T)  # a transposed view, as _head_matmul passes it
    assert [n.SerializeToString() for n in nodes] == [n.SerializeToString() for n in whole_nodes]
    assert [t.SerializeToString() for t in chunked] == [t.SerializeToString() for t in whole]
    assert {a.name: a.i for a in nodes[0].attribute}["N"] == 37


def test_embedding_quantizer_in_row_chunks_is_the_whole_tables(monkeypatch):
    """The table quantized ROWS rows at a time (a 128k-row table's float copies stay a chunk's
    size) is the whole table's quantization; ORT's GatherBlockQuantized reads back each row's
    codes times its blocks' scales, and a zero row (padding) stays zero."""
    import onnxruntime as ort

    from arx.calibration import embedding_quant

    rng = np.random.default_rng(1)
    table = rng.standard_normal((37, 80)).astype(np.float32)
    table[3] = 0.0
    node = onnx.helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["x"], name="embed")
    q = embedding_quant.EmbeddingQuantizer(group_size=32)
    whole_nodes, whole = q.quantize(node, table)
    monkeypatch.setattr(embedding_quant, "ROWS", 8)  # 37 rows: 4 chunks of 8 and one of 5
    nodes, chunked = q.quantize(node, table)
    assert [n.SerializeToString() for n in nodes] == [n.SerializeToString() for n in whole_nodes]
    assert [t.SerializeToString() for t in chunked] == [t.SerializeToString() for t in whole]
    codes, scales = (numpy_helper.to_array(t) for t in chunked)
    assert codes.shape == (37, 80) and scales.shape == (37, 3)  # blocks of 32 over 80
    ids = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [None])
    out = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 80])
    graph = onnx.helper.make_graph(nodes, "g", [ids], [out], initializer=chunked)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    rows = np.array([0, 3, 36], dtype=np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]
                               ).run(None, {"input_ids": rows})[0]
    expected = embedding_quant._dequantize_rows(codes, scales, 32)[rows]
    np.testing.assert_array_equal(got, expected)
    assert not got[1].any()
    # within a step (half of one, but for the value clipped at +7 on the far side of the sign)
    assert np.abs(got - table[rows]).max() <= np.abs(scales).max() + 1e-6


def _run(nodes, initializers, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    helper = onnx.helper
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outs, initializer=initializers),
                              opset_imports=[helper.make_opsetid("", 21),
                                             helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]
                                ).run(outputs, feeds)


def test_a_tied_head_shares_its_codes_with_the_embedding():
    """The tied head's MatMulNBits codes, read in place as a uint8 GatherBlockQuantized
    (default zero point 8 = MatMulNBits' implicit one), give each row's values as the head holds
    them: the logits' weights and the embeddings are one set of numbers, at 4 bits and at 8
    (zero point 128). Rows the head pads (K not a multiple of the block) are not shared."""
    from arx.calibration.embedding_quant import head_codes_embedding
    from arx.calibration.weight_only import LinearQuantizer, _unpack

    rng = np.random.default_rng(2)
    v, h, bs = 40, 64, 32
    table = rng.standard_normal((v, h)).astype(np.float32)
    head = onnx.helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="lm_head")
    gather = onnx.helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["e"], name="embed")
    nodes, tensors = LinearQuantizer(bits=4, group_size=bs, accuracy_level=0).quantize(head, table.T)
    shared, extra = head_codes_embedding(nodes[0], gather, (v, h))
    ids, x = np.array([[0, 7, 39]], np.int64), rng.standard_normal((2, h)).astype(np.float32)
    embedded, logits = _run(nodes + shared, tensors + extra, {"input_ids": ids, "x": x}, ["e", "logits"])
    blob, scales = (numpy_helper.to_array(t) for t in tensors)
    codes = _unpack(blob, 4, h, v, h // bs).astype(np.float32) - 8
    rows = (codes.reshape(v, h // bs, bs) * scales.reshape(v, -1, 1)).reshape(v, h)
    np.testing.assert_array_equal(embedded, rows[ids])
    np.testing.assert_allclose(logits, x @ rows.T, atol=1e-4)
    padded = LinearQuantizer(bits=4, group_size=bs, accuracy_level=0).quantize(head, table[:, :48].T)
    assert head_codes_embedding(padded[0][0], gather, (v, 48)) is None
    nodes, tensors = LinearQuantizer(bits=8, group_size=bs, accuracy_level=0).quantize(head, table.T)
    shared, extra = head_codes_embedding(nodes[0], gather, (v, h))
    (embedded,) = _run(nodes + shared, tensors + extra, {"input_ids": ids, "x": x}, ["e"])
    blob, scales = (numpy_helper.to_array(t) for t in tensors)
    rows = ((blob.astype(np.float32) - 128) * scales.reshape(v, -1, 1)).reshape(v, h)
    np.testing.assert_array_equal(embedded, rows[ids])


def test_report_measures_what_calibrate_measures(tiny_pair):
    """Against the PyTorch model instead of the fp32 bundle, on the same held-out tokens: the
    same quantized perplexity, a reference perplexity equal to the fp32 bundle's within float
    rounding, the same top-1 agreement, and a KL no larger than calibrate's exact one (the tail
    beyond the reference's top-64 is one bucket)."""
    calibrated, direct, _ = tiny_pair
    c = read_manifest(calibrated).extensions["quantization"]["accuracy"]
    d = read_manifest(direct).extensions["quantization"]["accuracy"]
    assert d["tokens"] == c["tokens"] > 100
    assert d["ppl_quantized"] == pytest.approx(c["ppl_quantized"], rel=1e-6)
    assert d["ppl_fp32"] == pytest.approx(c["ppl_fp32"], rel=1e-4)
    assert d["top1_agreement"] == pytest.approx(c["top1_agreement"], abs=2 / c["tokens"])
    assert 0.8 * c["kl_mean"] <= d["kl_mean"] <= c["kl_mean"] * (1 + 1e-6)
    report = json.loads((direct / "reports" / "accuracy.json").read_text())
    assert "run arx calibrate for the per-layer analysis" in report["layer_error_method"]
    assert report["settings"]["reference"]["framework"] == "torch"
    # the gate was 0 and w4 raised perplexity: written only because of --force
    assert d["ppl_increase"] > 0 and d["passed"] is False and d["forced"] is True


def test_inspect_says_what_parity_checked(tiny_pair, capsys):
    from arx.cli import main

    calibrated, direct, _ = tiny_pair
    assert main(["inspect", str(direct)]) == 0
    out = capsys.readouterr().out
    assert "parity     passed (first 2 of 4 layers in float32)" in out, out
    assert "quantized  w4" in out and "gate 0% FORCED past" in out, out
    assert "token embedding int4 (GatherBlockQuantized, codes shared with lm_head)" in out, out
    assert main(["inspect", str(calibrated)]) == 0
    assert "parity     passed (of the fp32 source)" in capsys.readouterr().out


def test_reference_rows_keep_top_k_only_and_bound_the_kl():
    """What export keeps of the reference per position: O(k), not O(V) (a view of the (T, V)
    argpartition kept 32 MB a sequence alive on a 32k vocabulary); its KL is the exact one
    with the tail merged, so never above it, and exact when k covers the vocabulary."""
    from arx.calibration.evaluate import RefRows, log_softmax

    rng = np.random.default_rng(0)
    lp_ref = log_softmax(rng.normal(size=(127, 2048)) * 3)
    lp_q = log_softmax(np.log(np.exp(lp_ref) + 1e-4 * rng.random((127, 2048))))
    targets = rng.integers(0, 2048, 127)
    rows = RefRows.of(lp_ref, targets, 64)
    held = sum((a.base if a.base is not None else a).nbytes
               for a in (rows.target, rows.top1, rows.lp, rows.idx))
    assert held <= 127 * (64 * 16 + 16)
    # the k largest of each row, largest first
    np.testing.assert_array_equal(rows.idx, np.argsort(-lp_ref, axis=-1, kind="stable")[:, :64])
    np.testing.assert_array_equal(rows.lp, np.take_along_axis(lp_ref, rows.idx, -1))
    exact = RefRows.of(lp_ref, targets).kl(lp_q)
    assert 0 < rows.kl(lp_q) <= exact
    assert RefRows.of(lp_ref, targets, 2048).kl(lp_q) == pytest.approx(exact, rel=1e-9)


def test_over_the_gate_nothing_is_written(tiny_pair, tmp_path):
    *_, data = tiny_pair
    out = tmp_path / "w4.arx"
    with pytest.raises(ArxError, match="over the 0% gate.*nothing was written"):
        export_model(source=TINY, output=out, options=ExportOptions(
            progress=False, check_parity=False,
            quantize=_options("w4", data, max_ppl_increase=0.0)))
    assert not out.exists()


@pytest.mark.parametrize("flags, says", [
    (["--quantize", "w8a8"], "arx calibrate --scheme w8a8"),
    (["--quantize", "w4", "--dtype", "fp16"], "drop --dtype"),
    (["--quantize", "w4", "--group-size", "100"], "--group-size must be one of"),
    (["--data", "x.txt"], "--data is an option of --quantize"),
    (["--eval-samples", "4"], "--eval-samples is an option of --quantize"),
    (["--embedding", "float"], "--embedding is an option of --quantize"),
    (["--quantize", "w8a8", "--embedding", "quantize"], "--embedding quantize is for the weight-only"),
    (["--quantize", "w4", "--eval-samples", "0"], "--eval-samples must be >= 1"),
])
def test_refusals_in_one_line(tmp_path, capsys, flags, says):
    from arx.cli import main

    out = tmp_path / "b.arx"
    assert main(["export", str(TINY), "-o", str(out), "-q", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arx: error:") and says in err[0], err
    assert not out.exists()


def test_moe_is_refused_before_any_work(tmp_path):
    from tiny_models import make_hf_model

    make_hf_model("mixtral", tmp_path / "mixtral")
    with pytest.raises(ArxError, match="mixture-of-experts.*arx calibrate"):
        export_model(source=tmp_path / "mixtral", output=tmp_path / "m.arx", options=ExportOptions(
            progress=False, quantize=_options("w4", DataOptions(random=True))))
    assert not (tmp_path / "m.arx").exists()


def test_budget_names_w4_where_fp16_does_not_fit(tmp_path, monkeypatch, capsys):
    """A bf16 checkpoint: the w4 bundle and peak are below fp16's; with memory between the two
    the refusal names --quantize w4, and that export runs (its reference in bf16)."""
    import arx.export.budget as budget
    from arx.cli import main
    from arx.export.sources import load_source
    from bench_scripts import load_script

    folder = tmp_path / "bf16"  # a 3-layer bf16 Llama in shards, as test_streamed_export's
    load_script("random_checkpoint").write_llama(folder, BF16_SHAPE, shard_bytes=64 << 10)
    src = load_source(folder)
    fp16_bundle, fp16 = budget.estimate(src, "float16", True)
    w4_bundle, w4 = budget.estimate(src, "float32", True, "w4")
    assert w4_bundle < fp16_bundle and w4 < fp16
    monkeypatch.setattr(budget, "available_memory", lambda: int(w4) + 1)
    assert main(["export", str(folder), "-o", str(tmp_path / "b.arx"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize w4" in err[0] and "--dtype fp16" not in err[0], err
    assert main(["export", str(folder), "-o", str(tmp_path / "b.arx"), "-q", "--quantize", "w4",
                 "--no-parity"]) == 0
    m = read_manifest(tmp_path / "b.arx")
    assert m.extensions["quantization"]["accuracy"]["data"] == "random token ids"
    report = json.loads((tmp_path / "b.arx" / "reports" / "accuracy.json").read_text())
    assert report["settings"]["reference"]["dtype"] == "bfloat16"
    # bf16 weights; float32 arithmetic unless this CPU has bf16 (export/float32_compute.py)
    from arx.export.float32_compute import native_half

    compute = "bfloat16" if native_half("bfloat16") else "float32"
    assert report["settings"]["reference"]["compute"] == compute
    assert np.isfinite(m.extensions["quantization"]["accuracy"]["ppl_quantized"])


@pytest.mark.parametrize("shape, spread", [((3, 37, 500), 4), ((40, 33), 4), ((1, 1, 10), 4),
                                           ((9,), 4), ((0, 5), 4), ((20, 3000), 400)])
def test_log_softmax_in_place_is_the_textbook_one_bit_for_bit(shape, spread):
    """The gate's log-softmax, written in place a few rows at a time (its exp floored where
    it would underflow: logits spanning thousands, as a random-weight model's do), gives
    exactly what x - max - log(sum(exp(x - max))) in float64 gives: metrics do not move."""
    from arx.calibration.evaluate import log_softmax

    x = (np.random.default_rng(1).standard_normal(shape) * spread).astype(np.float32)
    wide = x.astype(np.float64) - x.astype(np.float64).max(axis=-1, keepdims=True) \
        if x.size else x.astype(np.float64)
    want = wide - np.log(np.exp(wide).sum(axis=-1, keepdims=True)) if x.size else wide
    got = log_softmax(x)
    assert got.dtype == np.float64 and got.shape == x.shape and np.array_equal(got, want)
    reused = np.full(x.shape, np.nan)
    assert log_softmax(x, reused) is reused and np.array_equal(reused, want)
