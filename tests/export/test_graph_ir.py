"""export/graph_ir.py: arx's edits over onnx_ir (names, constants, replacing a node's outputs,
the sort and prune) keep a graph ONNX Runtime runs to the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from arx.export.graph_ir import Editor, from_proto, sort_and_prune, to_proto


def _model() -> onnx.ModelProto:
    """y = Relu(x + b); an unused input `dead` and an initializer only it reads."""
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["s"], name="add"),
         helper.make_node("Relu", ["s"], ["y"], name="relu"),
         helper.make_node("Neg", ["dead"], ["unused"], name="neg")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
              helper.make_tensor_value_info("dead", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.float32([1, -2, 3]), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(["y"], {i.name: x if i.name == "x" else np.zeros(1, np.float32)
                         for i in s.get_inputs()})[0]


def test_replacing_a_node_keeps_names_and_outputs():
    """Relu replaced by Max(s, 0) under the same output name; constants deduplicated; the
    appended node sorted, the dead Neg, its input and nothing else pruned."""
    x = np.float32([[-3, 1, 0.5], [2, 2, -4]])
    model = from_proto(_model())
    ed = Editor(model.graph, prefix="t")
    relu = next(n for n in model.graph if n.op_type == "Relu")
    zero = ed.const(0.0, np.float32)
    assert ed.const(0.0, np.float32) is zero and zero.name == "t/const"
    (y,) = ed.node("Max", ["s", zero], ["y"], name="max")
    model.graph.remove(relu, safe=True)
    assert y.is_graph_output() and y.type == model.graph.outputs[0].type
    assert ed.fresh("max") == "t/max_1"  # the node took t/max
    ed.insert_after(ed.values["s"], "Identity", name="s_copy", rename="add_out")
    sort_and_prune(model)
    out = to_proto(model)
    assert [i.name for i in out.graph.input] == ["x"]
    assert [(n.op_type, list(n.output)) for n in out.graph.node] == [
        ("Add", ["t/add_out"]), ("Identity", ["s"]), ("Max", ["y"])]
    assert [t.name for t in out.graph.initializer] == ["b", "t/const"]
    assert not out.graph.value_info  # no stale copies of the initializers' types
    np.testing.assert_array_equal(_run(out, x), _run(_model(), x))


def test_prune_keeps_named_inputs():
    model = from_proto(_model())
    sort_and_prune(model, keep_inputs=["dead"])
    out = to_proto(model)
    assert [i.name for i in out.graph.input] == ["x", "dead"]
    assert [n.name for n in out.graph.node] == ["add", "relu"]


def _decode_step(model: onnx.ModelProto, kv) -> list[np.ndarray]:
    """One decode step of a bundle decoder (fp32 cache) on fixed feeds, every output."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[5], [9]], np.int64),
             "attention_mask": np.ones((2, 4), np.int64),
             "logits_indices": np.zeros((2, 1), np.int64)}
    for past, _ in kv.pairs():
        feeds[past] = rng.standard_normal((2, kv.kv_heads, 3, kv.head_dim)).astype(np.float32)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})


def test_kv_retype_then_restore_gives_the_decoder_back(exported_bundle):
    """export/kv_dtype: the fp16 casts and int8 scales retype_decoder adds, found again through
    the IR's use lists by restore_decoder (arx build's first pass), leave the fp32 decoder's
    outputs bit for bit; the int8 scales come back as given."""
    from arx.export.kv_dtype import restore_decoder, retype_decoder
    from arx.manifest import read_manifest

    bundle = exported_bundle("llama")
    kv = read_manifest(bundle).kv
    original = onnx.load(str(bundle / "decoder.onnx"))
    want = _decode_step(original, kv)
    scales = {past: np.full((kv.kv_heads, 1, kv.head_dim), 0.01 * (i + 1), np.float32)
              for i, (past, _) in enumerate(kv.pairs())}
    for dtype in ("float16", "int8"):
        model = onnx.ModelProto.FromString(original.SerializeToString())
        retype_decoder(model, kv, dtype, scales)
        assert model.SerializeToString() != original.SerializeToString()
        ir_model = from_proto(model)
        got_scales = restore_decoder(ir_model, kv)
        back = to_proto(ir_model)
        assert sorted(n.op_type for n in back.graph.node) == sorted(
            n.op_type for n in original.graph.node)
        assert {t.name for t in back.graph.initializer} == {t.name for t in original.graph.initializer}
        for a, b in zip(_decode_step(back, kv), want):
            assert a.tobytes() == b.tobytes()
        if dtype == "int8":
            assert got_scales.keys() == scales.keys()
            for past in scales:
                np.testing.assert_array_equal(got_scales[past], scales[past])
        else:
            assert got_scales is None
