"""The TensorRT form of MoE bundles: the com.microsoft MoE node (and a w4 bundle's QMoE)
rewritten into the dense standard-op experts, run by ORT, gives the bundle's own outputs."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort

from form_runs import form_for, ragged_steps, run_form, run_reference

from arx.calibration.moe_quant import quantize_moe
from arx.manifest import read_manifest


def _fp32_session(model):
    """No graph optimizations: ORT would fuse a DequantizeLinear + MatMul into MatMulNBits."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_w4_qmoe_bundle_form_matches_bundle(exported_bundle, tmp_path):
    """Experts as QMoE (4-bit, fp32 compute) in the bundle; the form's float experts are its
    dequantized integers, so the ragged prefill + decode logits agree."""
    bundle = tmp_path / "mixtral-w4.arx"
    shutil.copytree(exported_bundle("mixtral"), bundle)
    m = read_manifest(bundle)
    model = onnx.load(str(bundle / m.decoder.file))
    assert quantize_moe(model, bits=4, block=16, accuracy_level=0) == 2
    onnx.save_model(model, str(bundle / m.decoder.file), save_as_external_data=True,
                    location=m.decoder.file + ".data", all_tensors_to_one_file=True)
    form = form_for(bundle, attention="native", sampler="argmax")
    ops = {(n.domain, n.op_type) for n in form.proto.graph.node}
    assert not {o for o in ops if o[1] in ("MoE", "QMoE")}
    steps = ragged_steps()
    for ref, (last, _) in zip(run_reference(bundle, steps),
                              run_form(_fp32_session, form.proto, m, steps)):
        np.testing.assert_allclose(last, ref, atol=1e-4, rtol=0)
