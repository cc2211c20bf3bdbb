"""QMoE for the w4/w8 experts of an --moe op bundle (calibration/moe_quant.py): the integers
are the ones dequantize_qmoe reads back (so the TensorRT forms' dense experts are the bundle's),
and the quantized layer stays close to the float one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from arx.calibration.moe_quant import qmoe_fits, quantize_moe
from arx.export.moe_rewrite import densify_moe


def _run(model: onnx.ModelProto, batch=3, width=5) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng, feeds = np.random.default_rng(0), {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(3, 150, (batch, width))
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, width), np.int64)
        elif i.name == "logits_indices":
            feeds[i.name] = np.tile(np.arange(width), (batch, 1))
        else:
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    return session.run(["logits"], feeds)[0]


def test_qmoe_integers_round_trip(exported_bundle):
    """4-bit QMoE at fp32 compute (accuracy level 0) = the dense graph of its dequantized
    weights: the packing, scales and zero are what the kernel reads."""
    model = onnx.load(str(exported_bundle("mixtral") / "decoder.onnx"))
    assert qmoe_fits(model, 16) and not qmoe_fits(model, 24) and not qmoe_fits(model, 8)
    assert quantize_moe(model, bits=4, block=16, accuracy_level=0) >= 1
    assert {n.op_type for n in model.graph.node} >= {"QMoE"}
    quantized = _run(model)
    densify_moe(model)  # QMoE -> float experts (what arx build does)
    assert "QMoE" not in {n.op_type for n in model.graph.node}
    np.testing.assert_allclose(_run(model), quantized, atol=1e-4, rtol=0)


def test_unnormalised_routing_is_not_qmoe(exported_bundle):
    """The tiny Qwen3-MoE (norm_topk_prob False): QMoE's normalize_routing_weights=0 is not
    the MoE op's (checked: its logits differ from the dequantized dense form's), so the
    calibrator keeps it dense; forced, the difference shows."""
    model = onnx.load(str(exported_bundle("qwen3_moe") / "decoder.onnx"))
    assert not qmoe_fits(model, 16)
    quantize_moe(model, bits=4, block=16, accuracy_level=0)
    quantized = _run(model)
    densify_moe(model)
    assert np.abs(_run(model) - quantized).max() > 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_qmoe_close_to_float(bits, exported_bundle):
    model = onnx.load(str(exported_bundle("mixtral") / "decoder.onnx"))
    ref = _run(model).ravel()
    quantize_moe(model, bits=bits, block=16, accuracy_level=0)
    got = _run(model).ravel()
    cosine = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > (0.99 if bits == 8 else 0.9), cosine
