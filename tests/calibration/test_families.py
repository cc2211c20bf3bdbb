"""`arx calibrate --scheme w4` on the families beyond Llama: every linear of the graph becomes
MatMulNBits (a MoE layer's experts included), the MoE router stays float, and the quantized
bundle generates through the runtime with logits close to the fp32 bundle's.

The tiny models have no tokenizer, so calibration draws --random token ids; the gate is forced
(random weights, random data: the accuracy report means nothing here, docs/calibration.md
measures accuracy on the trained default model).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tiny_models import FAMILIES

from arx.cli import main
from arx.export.moe_rewrite import densify_moe
from arx.manifest import read_manifest

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2")  # covered by test_calibrate
NEW_FAMILIES = [f for f in FAMILIES if f not in LLAMA_LIKE]


def _last_logits(bundle, ids: list[int]) -> np.ndarray:
    from arx.runtime.decoder import DecoderSession

    with DecoderSession(bundle) as s:
        cache = s.new_cache(1, 32)
        return s.step(cache, np.array([ids]), np.array([len(ids)]))[0]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_w4_calibrates_every_linear(family, exported_bundle, tmp_path):
    fp32 = exported_bundle(family)
    out = tmp_path / f"{family}-w4.arx"
    rc = main(["calibrate", str(fp32), "--scheme", "w4", "--random", "--samples", "4",
               "--seq-len", "16", "--eval-samples", "2", "--group-size", "16", "--no-plot",
               "--force", "-q", "-o", str(out)])
    assert rc == 0 and read_manifest(out).extensions["quantization"]["scheme"] == "w4"
    before = onnx.load(str(fp32 / "decoder.onnx"))
    after = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    moe = [n.name for n in before.graph.node if n.op_type == "MoE"]  # --moe op bundles
    qmoe = [n.name for n in after.graph.node if n.op_type == "QMoE"]
    if moe and not qmoe:  # the dense fallback: experts quantized as the dense form's MatMuls
        densify_moe(before)
    inits = {t.name for t in before.graph.initializer}
    linears = {n.name for n in before.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    nbits = {n.name.removesuffix("_Q4") for n in after.graph.node if n.op_type == "MatMulNBits"}
    assert nbits == linears | {"lm_head"}  # qkv, o, every MLP or expert, lm_head (untied)
    routers = [n.name for n in after.graph.node if n.name.endswith(".router")]
    assert all(n.op_type == "MatMul" for n in after.graph.node if n.name in routers)
    config = read_manifest(fp32).model["config"]
    if config["num_experts"]:  # QMoE where routing renormalises (Mixtral), else dense experts
        assert routers and moe and qmoe == (moe if config["norm_topk_prob"] else [])
        assert qmoe or any(".experts.3.down_proj" in n for n in nbits)
    ids = [1, 17, 33, 99, 5]
    ref, got = _last_logits(fp32, ids).ravel(), _last_logits(out, ids).ravel()
    cosine = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.8  # a wrong scale, layout or expert mix-up lands near 0
