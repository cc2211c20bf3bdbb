"""`arx calibrate` end to end on a tiny Llama: each scheme, graph structure, cache, gate, CLI.

Tolerances are on a random 2-layer model (hidden 64), so they bound gross errors (a wrong
scale, a transposed weight), not accuracy; accuracy is measured on the trained default model
(docs/calibration.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from arx.calibration.calibrator import calibrate_bundle
from arx.calibration.options import SCHEMES, CalibrateOptions, DataOptions, QuantOptions
from arx.errors import ArxError
from arx.manifest import read_manifest

# max |logits_q - logits_fp32| / max |logits_fp32| on a held-out sequence, and top-1 agreement
TOLERANCE = {"w8a8": (0.10, 0.85), "w8": (0.05, 0.90), "w4": (0.40, 0.50)}


def options(data: Path, scheme: str = "w8a8", **quant) -> CalibrateOptions:
    return CalibrateOptions(quant=QuantOptions(scheme=scheme, group_size=quant.pop("group_size", 32), **quant),
                            data=DataOptions(path=str(data), samples=24, seq_len=32, eval_samples=8),
                            progress=False, plot=False, force=True)


def decoder_logits(bundle: Path, ids: np.ndarray) -> np.ndarray:
    from arx.runtime.decoder import DecoderSession

    with DecoderSession(bundle) as s:
        return s.step(s.new_cache(1, len(ids)), ids[None, :], np.array([len(ids)]))[0]


@pytest.fixture(scope="module")
def quantized(llama_bundle, calib_text, tmp_path_factory):
    """scheme -> quantized bundle (made once per module)."""
    made = {}

    def get(scheme: str) -> Path:
        if scheme not in made:
            out = tmp_path_factory.mktemp(f"q-{scheme}") / f"{scheme}.arx"
            calibrate_bundle(bundle=llama_bundle, output=out, options=options(calib_text, scheme))
            made[scheme] = out
        return made[scheme]

    return get


@pytest.mark.parametrize("scheme", ["w8a8", "w8", "w4"])
def test_scheme_runs_in_runtime_close_to_fp32(scheme, quantized, llama_bundle):
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.generate import GenerateOptions, generate

    out = quantized(scheme)
    ids = np.arange(5, 37, dtype=np.int64)
    ref, q = decoder_logits(llama_bundle, ids), decoder_logits(out, ids)
    rel_tol, top1_min = TOLERANCE[scheme]
    assert np.abs(q - ref).max() / np.abs(ref).max() < rel_tol
    m = read_manifest(out)
    ext = m.extensions["quantization"]
    assert ext["scheme"] == scheme and ext["accuracy"]["top1_agreement"] >= top1_min
    assert (out / "tokenizer.json").is_file() and (out / "calibration.json").is_file()
    assert (out / "reports" / "accuracy.json").is_file()
    with DecoderSession(out) as session:  # decode steps too, as arx generate runs them
        result = generate(session, [[1, 5, 9, 13]], GenerateOptions(max_new_tokens=6, stop_on_eos=False))
    assert len(result.tokens[0]) == 6


def test_w8a8_graph_is_explicit_symmetric_int8(quantized):
    out = quantized("w8a8")
    model = onnx.load(str(out / "decoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        zp = numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any(), n.name  # symmetric int8
    weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {consumers[n.output[0]].op_type for n in weight_dq} == {"MatMul"}
    for n in weight_dq:
        w, scale = inits[n.input[0]], numpy_helper.to_array(inits[n.input[1]])
        axis = {a.name: a.i for a in n.attribute}.get("axis")
        assert w.data_type == onnx.TensorProto.INT8 and axis == 1 and scale.shape == (w.dims[1],)
    quantized_mm = {consumers[n.output[0]].name for n in weight_dq}
    matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert "lm_head" in matmuls and "lm_head" not in quantized_mm  # w8a8 keeps the head float
    assert len(quantized_mm) == len(matmuls) - 1  # every other linear, o_proj included
    # gate and up are packed, so each activation DQ feeds one MatMul (ORT CPU fuses only those)
    readers = Counter(i for n in model.graph.node for i in n.input)
    act_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    assert act_dq and all(readers[n.output[0]] == 1 for n in act_dq)
    assert "layers.0.mlp.up_proj+gate_proj" in matmuls or "layers.0.mlp.gate_proj+up_proj" in matmuls
    for n in model.graph.node:  # attention and norms read float tensors, not DQ outputs
        if n.op_type in ("GroupQueryAttention", "RMSNormalization"):
            assert not any(i.endswith("_DequantizeLinear_Output") for i in n.input)


def test_weight_only_ships_matmulnbits(quantized):
    for scheme, bits in (("w8", 8), ("w4", 4)):
        model = onnx.load(str(quantized(scheme) / "decoder.onnx"), load_external_data=False)
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
        assert len(nbits) == 11 and all(a["bits"] == bits and a["block_size"] == 32 for a in attrs)
        # both quantize activations per block at run time by default (the scheme table says so)
        level, act_bits = 4, 8
        assert all(a["accuracy_level"] == level for a in attrs)
        ext = read_manifest(quantized(scheme)).extensions["quantization"]
        assert ext["accuracy_level"] == level and ext["activation_bits"] == act_bits
        assert ("float activations" in SCHEMES[scheme].summary) == (act_bits is None)
        assert not any(n.op_type == "MatMul" for n in model.graph.node)  # lm_head included


def test_calibration_cache_reproduces_the_model(llama_bundle, calib_text, tmp_path):
    opts = options(calib_text, smoothquant=0.5)
    a, b, c = tmp_path / "a.arx", tmp_path / "b.arx", tmp_path / "c.arx"
    calibrate_bundle(bundle=llama_bundle, output=a, options=opts)
    calibrate_bundle(bundle=llama_bundle, output=b, options=opts)
    cached = CalibrateOptions(quant=opts.quant, data=opts.data, progress=False, plot=False, force=True,
                              calibration_cache=str(a / "calibration.json"))
    calibrate_bundle(bundle=llama_bundle, output=c, options=cached)

    def weights(bundle):
        m = onnx.load(str(bundle / "decoder.onnx"))
        return {t.name: t.SerializeToString() for t in m.graph.initializer}

    wa = weights(a)
    assert wa == weights(b) == weights(c)  # bitwise


def test_keep_fp_and_lm_head_choice(llama_bundle, calib_text, tmp_path):
    out = tmp_path / "k.arx"
    opts = options(calib_text, "w4", keep_fp=("layers.1", "layers.0.mlp.down_proj"), quantize_lm_head=False)
    result = calibrate_bundle(bundle=llama_bundle, output=out, options=opts)
    model = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    float_mm = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert float_mm == {"lm_head", "layers.0.mlp.down_proj", *{f"layers.1.{p}" for p in
                        ("attn.qkv_proj", "attn.o_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")}}
    assert sorted(result.manifest.extensions["quantization"]["float"]) == sorted(float_mm)


def test_embedding_choice(llama_bundle, calib_text, tmp_path):
    """w4 writes the token embedding int4 (GatherBlockQuantized, in the decoder and in the
    general-step graph that shares its weights); --embedding float keeps the float Gather;
    w8 keeps this untied table float (ORT quantizes Gathers at 4 bits only); w8a8 refuses
    --embedding quantize in one line."""
    from arx.runtime.roofline import weight_bytes

    for choice, op in ((None, "GatherBlockQuantized"), (False, "Gather")):
        out = tmp_path / f"{choice}.arx"
        result = calibrate_bundle(bundle=llama_bundle, output=out,
                                  options=options(calib_text, "w4", quantize_embedding=choice))
        for graph in ("decoder.onnx", "decoder_step.onnx"):
            model = onnx.load(str(out / graph), load_external_data=False)
            assert [n.op_type for n in model.graph.node if "input_ids" in n.input[1:2]] == [op]
        section = result.manifest.extensions["quantization"]["embedding"]
        assert (section == "float") == (choice is False)
        # arx profile's roofline: a decode step reads a row of the table, codes and scales alike
        tables = set(weight_bytes(out, result.manifest)["gather_only"])
        assert tables == ({"embed_tokens.weight"} if choice is False else
                          {"embed_tokens.weight_Q4", "embed_tokens.weight_scales"})
        assert np.isfinite(decoder_logits(out, np.array([5, 9, 14, 22]))).all()
    w8 = calibrate_bundle(bundle=llama_bundle, output=tmp_path / "w8.arx",
                          options=options(calib_text, "w8"))
    assert w8.manifest.extensions["quantization"]["embedding"] == "float"
    with pytest.raises(ArxError, match="--embedding quantize is for the weight-only schemes"):
        options(calib_text, "w8a8", quantize_embedding=True)


def test_a_tied_table_a_float_head_reads_stays_float():
    from onnx import helper, numpy_helper

    from arx.calibration.embedding_quant import quantize_embedding, token_embedding

    table = numpy_helper.from_array(np.ones((8, 4), np.float32), "embed_tokens.weight")
    nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["x"], name="embed"),
             helper.make_node("Transpose", ["embed_tokens.weight"], ["head"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "head"], ["logits"], name="lm_head")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], initializer=[table]))
    assert token_embedding(model) is None and quantize_embedding(model, group_size=16) is None
    del model.graph.node[1:]
    assert token_embedding(model).name == "embed"


@pytest.mark.parametrize("form", ["gemm", "transpose"])
def test_untie_gives_the_tied_head_its_own_weight_and_the_same_logits(form):
    """The exporter's Gemm(rows, table, transB=1), and the Transpose -> MatMul of earlier
    bundles, both become MatMul(rows, lm_head.weight) with the same logits."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from arx.calibration.graph import linears, untie_lm_head

    rng = np.random.default_rng(0)
    table = rng.standard_normal((8, 4)).astype(np.float32)
    consts = [numpy_helper.from_array(table, "embed_tokens.weight"),
              numpy_helper.from_array(np.array([-1, 4]), "flat"),
              numpy_helper.from_array(np.array([-1, 8]), "vocab")]
    if form == "gemm":  # as export/decoder_graph._tied_head writes it
        nodes = [helper.make_node("Reshape", ["x", "flat"], ["rows"]),
                 helper.make_node("Gemm", ["rows", "embed_tokens.weight"], ["y"], transB=1,
                                  name="lm_head"),
                 helper.make_node("Shape", ["x"], ["b"], end=1),
                 helper.make_node("Concat", ["b", "vocab"], ["shape"], axis=0),
                 helper.make_node("Reshape", ["y", "shape"], ["logits"])]
    else:
        nodes = [helper.make_node("Transpose", ["embed_tokens.weight"], ["t"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, 8])],
                              initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)

    def logits(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]
                                    ).run(None, {"x": x})[0]

    before = logits(model)
    assert untie_lm_head(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    assert [lin.weight for lin in linears(model)] == ["lm_head.weight"]
    np.testing.assert_allclose(logits(model), before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(before, x @ table.T, rtol=1e-5, atol=1e-5)
    assert not untie_lm_head(model)  # untied now: nothing to do


@pytest.mark.parametrize("scheme", ["w8a8", "w4"])
def test_quantized_bundle_takes_general_steps(quantized, scheme):
    """The general-step graph is rebuilt over the quantized decoder's weights: a ragged
    multi-token step after a past (what speculation verifies) runs on the quantized bundle and
    its last logits equal the fused graph's single steps."""
    from arx.runtime.decoder import DecoderSession

    bundle = quantized(scheme)
    with DecoderSession(bundle) as s:
        assert s.general_steps
        prompt = np.array([[5, 9, 14, 22, 7, 3]] * 2)
        wide = s.new_cache(2, 32)
        s.step(wide, prompt, np.array([6, 4]))
        got = s.step(wide, np.array([[11, 12, 13], [11, 0, 0]]), np.array([3, 1]), logits="last")
        for b, (n, new) in enumerate(((6, [11, 12, 13]), (4, [11]))):
            one = s.new_cache(1, 32)
            s.step(one, prompt[b:b + 1, :n], np.array([n]))
            for t in new:
                want = s.step(one, np.array([[t]]), np.array([1]), logits="last")
            np.testing.assert_allclose(got[b, 0], want[0, 0], atol=2e-3, rtol=0)
