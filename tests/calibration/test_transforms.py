"""Graph transforms on their own: the SmoothQuant fold is exact in fp32, and the Q/DQ-block
(TensorRT) form of a weight-only model computes what its MatMulNBits form does."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from arx.calibration import graph as G
from arx.calibration import smoothquant as sq
from arx.calibration.weight_only import matmulnbits_to_qdq, quantize_weight_only
from arx.manifest import read_manifest

IDS = np.arange(3, 40, dtype=np.int64)


def _logits(model: onnx.ModelProto, manifest, optimize: bool = True) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(["logits"], G.prefill_feeds(manifest, IDS, {i.name for i in s.get_inputs()}))[0]


def test_smoothquant_fold_is_exact_in_fp32(llama_bundle, tmp_path):
    manifest = read_manifest(llama_bundle)
    model = G.load_decoder(llama_bundle, manifest)
    ref = _logits(model, manifest)
    groups = sq.find_groups(model, {lin.node for lin in G.linears(model)})
    # per layer: attn_norm -> qkv, mlp_norm -> gate/up, up_proj -> down_proj; final_norm -> lm_head
    kinds = sorted(g.name.split(".")[-1] for g in groups)
    assert kinds == ["attn_norm"] * 2 + ["final_norm"] + ["mlp_norm"] * 2 + ["up_proj"] * 2
    probe = G.Probe(model, [g.act for g in groups], manifest, tmp_path)
    maxima = sq.activation_maxima(probe, groups, [IDS[:20], IDS[5:]])
    scales = sq.smoothing_scales(model, groups, maxima, alpha=0.8)
    assert all(not np.allclose(s, 1.0) for s in scales.values())  # the fold really moves scale
    sq.fold(model, groups, scales)
    np.testing.assert_allclose(_logits(model, manifest), ref, atol=1e-4, rtol=0)


def test_smoothquant_flattens_activation_outliers(llama_bundle, tmp_path):
    """After the fold the smoothed activations' channel maxima are closer to uniform."""
    manifest = read_manifest(llama_bundle)
    model = G.load_decoder(llama_bundle, manifest)
    groups = sq.find_groups(model, {lin.node for lin in G.linears(model)})
    before = sq.activation_maxima(G.Probe(model, [g.act for g in groups], manifest, tmp_path), groups, [IDS])
    sq.fold(model, groups, sq.smoothing_scales(model, groups, before, alpha=0.5))
    after = sq.activation_maxima(G.Probe(model, [g.act for g in groups], manifest, tmp_path), groups, [IDS])
    spread = lambda m: float(np.max(m) / np.median(m))  # noqa: E731
    assert all(spread(after[g.name]) < spread(before[g.name]) for g in groups)


def test_qdq_block_form_matches_matmulnbits(llama_bundle):
    manifest = read_manifest(llama_bundle)
    model = G.load_decoder(llama_bundle, manifest)
    for bits in (4, 8):
        nbits = quantize_weight_only(model, bits=bits, group_size=16, accuracy_level=0, exclude=[])
        ir_model = ir.from_proto(nbits)
        assert matmulnbits_to_qdq(ir_model) == 11
        qdq = ir.to_proto(ir_model)
        dqs = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dqs) == 11 and not any(n.op_type == "MatMulNBits" for n in qdq.graph.node)
        inits = {t.name: t for t in qdq.graph.initializer}
        want = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
        for n in dqs:
            attrs = {a.name: a.i for a in n.attribute}
            assert attrs == {"axis": 0, "block_size": 16} and inits[n.input[0]].data_type == want
            assert len(n.input) == 2  # no zero point: symmetric, as TensorRT requires
        assert max(op.version for op in qdq.opset_import if op.domain in ("", "ai.onnx")) >= 21
        # same integers and scales: bitwise equal with fp32 compute and no fusions
        np.testing.assert_array_equal(_logits(qdq, manifest, optimize=False), _logits(nbits, manifest, optimize=False))
        # and with ORT's optimizations (it fuses DQ+MatMul back into MatMulNBits)
        np.testing.assert_allclose(_logits(qdq, manifest), _logits(nbits, manifest, optimize=False), atol=0.05)


def test_tied_head_and_layernorm_family(exported_bundle, tmp_path):
    """GPT-2: LayerNorm (weight and bias fold), learned positions, lm_head tied to the embedding."""
    from arx.calibration.calibrator import calibrate_bundle
    from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions

    bundle = exported_bundle("gpt2")
    manifest = read_manifest(bundle)
    model = G.load_decoder(bundle, manifest)
    # the tied head reads the table as stored: a Gemm, no Transpose for ORT to copy at load
    head = next(n for n in model.graph.node if n.name == G.LM_HEAD)
    assert head.op_type == "Gemm" and head.input[1] == "embed_tokens.weight"
    assert "Transpose" not in {n.op_type for n in model.graph.node}
    ref = _logits(model, manifest)
    groups = sq.find_groups(model, {lin.node for lin in G.linears(model)})
    assert any(len(g.divide) == 2 for g in groups)  # LayerNorm weight and bias
    probe = G.Probe(model, [g.act for g in groups], manifest, tmp_path)
    sq.fold(model, groups, sq.smoothing_scales(model, groups, sq.activation_maxima(probe, groups, [IDS]), 0.5))
    np.testing.assert_allclose(_logits(model, manifest), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)

    data = DataOptions(random=True, samples=4, seq_len=24, eval_samples=2)
    for scheme in ("w4", "w8a8"):
        out = tmp_path / f"{scheme}.arx"
        quant = QuantOptions(scheme=scheme, group_size=16, smoothquant=0.5 if scheme == "w8a8" else None)
        calibrate_bundle(bundle=bundle, output=out,
                         options=CalibrateOptions(quant=quant, data=data, progress=False, plot=False, force=True))
        q = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
        ops = [n.op_type for n in q.graph.node]
        if scheme == "w4":  # the tied head got its own quantized copy; the Gather keeps fp32
            assert ops.count("MatMulNBits") == 9 and "Gemm" not in ops
        else:  # w8a8 keeps the tied head float: the Gemm over the table
            assert "QuantizeLinear" in ops and "Gemm" in ops
