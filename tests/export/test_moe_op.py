"""Mixture-of-experts layers as onnxruntime's com.microsoft MoE node (`arx export --moe op`,
the default) and as standard ops (`--moe dense`), and the rewrite of the node back into the
dense form that `arx build` and `arx calibrate` take (export/moe_rewrite.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tiny_models import hf_config

from arx.errors import ArxError
from arx.export.exporter import ExportOptions, export_model
from arx.export.families import FAMILIES
from arx.export.moe_graph import MOE_OP, moe_form
from arx.export.moe_rewrite import densify_moe
from arx.manifest import read_manifest

MOE_FAMILIES = ("mixtral", "qwen3_moe")


def _ops(bundle) -> list[tuple[str, str]]:
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph
    return [(n.domain, n.op_type) for n in graph.node]


def _feeds(session, rng, batch, width, past):
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(3, 150, (batch, width))
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, past + width), np.int64)
        elif i.name == "logits_indices":
            feeds[i.name] = np.tile(np.arange(width), (batch, 1))
        else:  # a random past of `past` positions
            feeds[i.name] = rng.standard_normal((batch, i.shape[1], past, i.shape[3]),
                                                dtype=np.float32)
    return feeds


def _logits(model_or_path, shapes=((1, 9, 0), (3, 6, 0), (1, 1, 9), (3, 1, 7))):
    """The decoder's logits on a prefill and decode steps (batch, width, past), seed 0."""
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) \
        else str(model_or_path)
    session, rng = ort.InferenceSession(src, providers=["CPUExecutionProvider"]), \
        np.random.default_rng(0)
    return [session.run(["logits"], _feeds(session, rng, *s))[0] for s in shapes]


@pytest.fixture(scope="module")
def both_forms(tmp_path_factory, hf_model_dir):
    """family -> (op bundle, dense bundle), both exported with parity checked."""
    made = {}

    def get(family):
        if family not in made:
            folder = hf_model_dir(family)[0]
            root = tmp_path_factory.mktemp(f"{family}-moe")
            made[family] = tuple(root / form for form in ("op", "dense"))
            for form, out in zip(("op", "dense"), made[family]):
                export_model(source=folder, output=out,
                             options=ExportOptions(progress=False, moe=form))
        return made[family]
    return get


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_op_form_equals_dense_form(family, both_forms):
    op, dense = both_forms(family)
    assert read_manifest(op).model["config"]["moe_form"] == "op"
    assert read_manifest(dense).model["config"]["moe_form"] == "dense"
    cfg = FAMILIES[family].read_config(hf_config(family))
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_layers))
    assert _ops(op).count(MOE_OP) == moe_layers and MOE_OP not in _ops(dense)
    for a, b in zip(_logits(op / "decoder.onnx"), _logits(dense / "decoder.onnx")):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert read_manifest(op).parity["passed"] is True


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_rewrite_gives_the_dense_graph(family, both_forms):
    """densify_moe of the op bundle: no MoE node left, the dense export's expert weights (same
    names, same values) and the op bundle's logits."""
    op, dense = both_forms(family)
    model = onnx.load(str(op / "decoder.onnx"))
    assert densify_moe(model) >= 1
    assert MOE_OP not in [(n.domain, n.op_type) for n in model.graph.node]
    onnx.checker.check_model(model)
    dense_model = onnx.load(str(dense / "decoder.onnx"))
    experts = {t.name: onnx.numpy_helper.to_array(t) for t in dense_model.graph.initializer
               if ".experts." in t.name}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
           if ".experts." in t.name}
    cfg = FAMILIES[family].read_config(hf_config(family))
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_layers))
    assert got.keys() == experts.keys() and len(got) == 3 * cfg.num_experts * moe_layers
    for name, value in experts.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    for a, b in zip(_logits(model), _logits(op / "decoder.onnx")):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_routing_bites_in_the_op(both_forms):
    """The node's k and normalisation decide the logits of the tiny configs: an op that ran
    every expert, or renormalised Qwen3-MoE's weights, would not pass the greedy tests."""
    for family, attr, value in (("mixtral", "k", 4), ("qwen3_moe", "normalize_routing_weights", 1)):
        path = both_forms(family)[0] / "decoder.onnx"
        model = onnx.load(str(path))
        for n in model.graph.node:
            if (n.domain, n.op_type) == MOE_OP:
                next(a for a in n.attribute if a.name == attr).i = value
        diff = max(np.abs(a - b).max() for a, b in zip(_logits(model), _logits(path)))
        assert diff > 1e-1, (family, attr, diff)


def test_moe_form_choice():
    cfg = FAMILIES["mixtral"].read_config(hf_config("mixtral"))
    assert moe_form(cfg, None) == "op" and moe_form(cfg, "dense") == "dense"
    gelu = dataclasses.replace(cfg, activation="gelu_tanh")
    assert moe_form(gelu, None) == "dense"  # ORT's op has SwiGLU experts only
    with pytest.raises(ArxError, match="--moe dense"):
        moe_form(gelu, "op")
    with pytest.raises(ArxError, match="--moe must be one of"):
        moe_form(cfg, "sparse")
    assert moe_form(FAMILIES["llama"].read_config(hf_config("llama")), None) == ""


def test_rewrite_refuses_a_node_it_does_not_know(both_forms):
    model = onnx.load(str(both_forms("mixtral")[0] / "decoder.onnx"))
    node = next(n for n in model.graph.node if (n.domain, n.op_type) == MOE_OP)
    next(a for a in node.attribute if a.name == "activation_type").s = b"gelu"
    with pytest.raises(ArxError, match="not the form arx exports"):
        densify_moe(model)


def test_cli_moe_option(hf_model_dir, tmp_path, capsys):
    from arx.cli import main

    out = tmp_path / "dense.arx"
    assert main(["export", str(hf_model_dir("mixtral")[0]), "--moe", "dense", "-q", "-o",
                 str(out)]) == 0
    assert read_manifest(out).model["config"]["moe_form"] == "dense"
    assert MOE_OP not in _ops(out)
    with pytest.raises(SystemExit) as e:
        main(["export", str(hf_model_dir("mixtral")[0]), "--moe", "sparse", "-o",
              str(tmp_path / "x.arx")])
    assert e.value.code == 2 and "--moe" in capsys.readouterr().err
    assert not (tmp_path / "x.arx").exists()
