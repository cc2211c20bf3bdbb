"""The TensorRT form of every family: ONNX checks, IO from the manifest, and numerics.

Numerics run the rewritten graph on ONNX Runtime with the arx plugin ops as Python custom ops
calling the plugins' NumPy references (ort_plugins.py), against the bundle's own ORT graph on
the same ragged prefill + decode steps. Tolerances: fp32 1e-4 abs on logits (same math, other
op order); fp16 5e-2 abs (half-precision weights and activations, fp32 norms).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from form_runs import (MISTRAL_WINDOW, S_MAX, form_for, ragged_steps, run_form, run_reference,
                       window_steps)

from tiny_models import NATIVE_ONLY, PLUGIN_FAMILIES

from arx.errors import ArxError
from arx.manifest import read_manifest

@pytest.mark.parametrize("family", PLUGIN_FAMILIES)
def test_form_passes_checker_and_strict_inference(family, exported_bundle):
    """make_tensorrt_form runs onnx.checker (full) and strict shape inference itself; check the
    result again from scratch and that no com.microsoft op survives."""
    from arx.builder.schemas import register_schemas

    form = form_for(exported_bundle(family), precision="fp16")
    register_schemas()
    onnx.checker.check_model(form.proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(form.proto, strict_mode=True, check_type=True)
    domains = {n.domain for n in inferred.graph.node}
    assert domains <= {"", "arx"}
    ops = [n.op_type for n in form.proto.graph.node if n.domain == "arx"]
    assert ops.count("kv_attention") == read_manifest(exported_bundle(family)).kv.layers
    assert ops.count("sample") == 1


@pytest.mark.parametrize("family", PLUGIN_FAMILIES)
def test_io_derived_from_manifest(family, exported_bundle):
    bundle = exported_bundle(family)
    m = read_manifest(bundle)
    form = form_for(bundle, precision="bf16")
    graph_inputs = {i.name: i for i in form.proto.graph.input}
    assert [t.name for t in form.stage.inputs] == list(graph_inputs)
    for past, present in m.kv.pairs():
        spec = next(t for t in form.stage.inputs if t.name == past)
        assert spec.shape[1:] == (m.kv.kv_heads, S_MAX, m.kv.head_dim)  # static cache
        assert spec.dtype == "bfloat16"
        assert present in [t.name for t in form.stage.outputs]
    assert "attention_mask" not in graph_inputs  # per-row lengths instead (ragged steps)
    for name in ("input_ids", "past_lengths", "new_lengths", "sampling_params", "presence",
                 "seed", "offset", "row"):
        assert name in graph_inputs
    out = {t.name: t for t in form.stage.outputs}
    assert out["token_ids"].dtype == "int32" and out["last_logits"].dtype == "float32"


@pytest.mark.parametrize("family", PLUGIN_FAMILIES)
@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 5e-2)])
def test_form_numerics_match_bundle(family, exported_bundle, ort_session, precision, atol):
    bundle = exported_bundle(family)
    manifest = read_manifest(bundle)
    steps = ragged_steps()
    expected = run_reference(bundle, steps)
    form = form_for(bundle, precision=precision)
    got = run_form(ort_session, form.proto, manifest, steps)
    for i, (ref, (last, ids)) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(last, ref, atol=atol, rtol=0, err_msg=f"{family} step {i}")
        if precision == "fp32":  # the sampler (temperature 0) picks the argmax in the engine
            np.testing.assert_array_equal(ids, ref.argmax(-1))


@pytest.mark.parametrize("family", NATIVE_ONLY)
def test_plugin_form_refuses_soft_capped_attention(family, exported_bundle):
    """The plugin has no softcap: the plugin form refuses in one line naming the remedy, and
    the native form (ONNX Attention's softcap) carries the cap on every layer."""
    with pytest.raises(ArxError, match="soft-caps its scores.*--attention native"):
        form_for(exported_bundle(family))
    form = form_for(exported_bundle(family), attention="native", sampler="argmax")
    caps = [a.f for n in form.proto.graph.node if n.op_type == "Attention"
            for a in n.attribute if a.name == "softcap"]
    assert caps == [3.0] * read_manifest(exported_bundle(family)).kv.layers


def test_sliding_window_mistral_beyond_the_window(exported_bundle, ort_session):
    """Mistral with a cache longer than its sliding window: GroupQueryAttention's
    local_window_size becomes kv_attention(window=24); the form matches the bundle's own graph
    (fp32 logits 1e-4, greedy ids) at every step, and without the window it would not."""
    s_max = 48
    bundle = exported_bundle("mistral")
    manifest = read_manifest(bundle)
    form = form_for(bundle, max_seq_len=s_max)
    attention = [n for n in form.proto.graph.node if n.op_type == "kv_attention"]
    assert {helper_attr(n, "window") for n in attention} == {MISTRAL_WINDOW}
    steps = window_steps()
    expected = run_reference(bundle, steps, s_max)
    got = run_form(ort_session, form.proto, manifest, steps, s_max=s_max)
    for i, (ref, (last, ids)) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(last, ref, atol=1e-4, rtol=0, err_msg=f"step {i}")
        np.testing.assert_array_equal(ids, ref.argmax(-1))
    for n in form.proto.graph.node:  # the same form without the window: the check has teeth
        for a in n.attribute:
            if a.name == "window":
                a.i = 0
    unwindowed = run_form(ort_session, form.proto, manifest, steps, s_max=s_max)
    assert max(np.abs(last - ref).max() for ref, (last, _) in zip(expected, unwindowed)) > 1e-2


def test_sliding_window_matches_hugging_face(exported_bundle, hf_model_dir, ort_session):
    """The windowed form against Hugging Face Mistral itself (sliding_window = 24) on a
    40-token prompt: every position's logits within 1e-4 (fp32, torch vs ORT + NumPy)."""
    torch = pytest.importorskip("torch")
    s_max, n = 48, 40
    bundle = exported_bundle("mistral")
    _, hf = hf_model_dir("mistral")
    prompt = np.random.default_rng(4).integers(3, 150, (1, n))
    with torch.no_grad():
        want = hf(torch.from_numpy(prompt)).logits[0].numpy()  # (n, V)
    form = form_for(bundle, max_seq_len=s_max, sampler="none", logits="all")
    got = run_form(ort_session, form.proto, read_manifest(bundle), [(prompt, np.array([n]))],
                    s_max=s_max, outputs=("logits",))[0][0][0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def helper_attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_int8_needs_calibrated_bundle(exported_bundle):
    with pytest.raises(ArxError, match="arx calibrate"):
        form_for(exported_bundle("llama"), precision="int8")


def test_cache_longer_than_bundle_is_refused(exported_bundle):
    with pytest.raises(ArxError, match="exceeds the bundle's context"):
        form_for(exported_bundle("llama"), max_seq_len=10_000)


def test_no_sampler_all_logits(exported_bundle):
    form = form_for(exported_bundle("qwen2"), sampler="none", logits="all")
    names = [o.name for o in form.proto.graph.output]
    assert "token_ids" not in names and "logits" in names
    assert not any(n.op_type == "sample" for n in form.proto.graph.node)


def _fake_w8a8_bundle(src, dst, zero_point: int = 0):
    """A bundle shaped like `arx calibrate --scheme w8a8` output: symmetric Q/DQ on the input and
    weight of every weight MatMul (per-tensor scales), and the quantization section."""
    import shutil

    from onnx import helper, numpy_helper

    shutil.copytree(src, dst)
    m = read_manifest(dst)
    model = onnx.load(str(dst / m.decoder.file))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            ws = np.float32(np.abs(w).max() / 127)
            q = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
            p = n.name
            g.initializer.extend([numpy_helper.from_array(q, f"{p}/wq"),
                                  numpy_helper.from_array(np.float32(ws), f"{p}/ws"),
                                  numpy_helper.from_array(np.float32(0.05), f"{p}/xs"),
                                  numpy_helper.from_array(np.int8(zero_point), f"{p}/zp")])
            nodes += [helper.make_node("DequantizeLinear", [f"{p}/wq", f"{p}/ws"], [f"{p}/w"]),
                      helper.make_node("QuantizeLinear", [n.input[0], f"{p}/xs", f"{p}/zp"], [f"{p}/xq"]),
                      helper.make_node("DequantizeLinear", [f"{p}/xq", f"{p}/xs", f"{p}/zp"], [f"{p}/x"])]
            n.input[0], n.input[1] = f"{p}/x", f"{p}/w"
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save_model(model, str(dst / m.decoder.file), save_as_external_data=True,
                    location=m.decoder.file + ".data", all_tensors_to_one_file=True)
    m.extensions["quantization"] = {"scheme": "w8a8", "format": "qdq", "symmetric": True}
    m.write(dst)
    return dst


@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_int8_from_qdq_bundle(exported_bundle, tmp_path, ort_session, attention):
    bundle = _fake_w8a8_bundle(exported_bundle("llama"), tmp_path / "w8a8.arx")
    form = form_for(bundle, precision="int8", attention=attention)
    ops = [n.op_type for n in form.proto.graph.node]
    assert form.qdq_nodes == ops.count("QuantizeLinear") + ops.count("DequantizeLinear") > 0
    steps = ragged_steps()[:2]
    expected = run_reference(bundle, steps)  # the same Q/DQ graph in its ORT form
    got = run_form(ort_session, form.proto, read_manifest(bundle), steps)
    for ref, (last, _) in zip(expected, got):  # fp16 around the Q/DQ pairs: a rounding step
        assert np.corrcoef(ref.ravel(), last.ravel())[0, 1] > 0.99  # can flip an int8 code


def test_int8_refuses_asymmetric_qdq(exported_bundle, tmp_path):
    bundle = _fake_w8a8_bundle(exported_bundle("llama"), tmp_path / "asym.arx", zero_point=3)
    with pytest.raises(ArxError, match="symmetric"):
        form_for(bundle, precision="int8")


@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_ragged_step_with_a_past(exported_bundle, ort_session, attention):
    """A step whose rows add different numbers of tokens after a past (a decode row padded into
    a wider verify/chunk step) writes and attends at each row's own positions: the batch gives
    each row's logits exactly as that row run alone (the old mask-sum bookkeeping assumed every
    row with a past added the whole step)."""
    bundle = exported_bundle("llama")
    m = read_manifest(bundle)
    form = form_for(bundle, attention=attention)
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(3, 150, n)) for n in (7, 3, 5)]
    steps = ragged_steps(prompts, decode_steps=0)
    steps.append((rng.integers(3, 150, (3, 3)), np.array([3, 1, 2], np.int64)))
    steps.append((rng.integers(3, 150, (3, 1)), np.ones(3, np.int64)))
    batch = run_form(ort_session, form.proto, m, steps)
    for b in range(3):
        alone = [(ids[b:b + 1, :lens[b]], lens[b:b + 1]) for ids, lens in steps]
        for (got, _), (want, _) in zip(batch, run_form(ort_session, form.proto, m, alone)):
            np.testing.assert_allclose(got[b], want[0], atol=1e-4, rtol=0)


def _weight_only_bundle(src, dst, bits: int):
    """A bundle shaped like `arx calibrate --scheme w4|w8` output: MatMulNBits weights, the
    head untied, and the token embedding as calibrate writes it (GatherBlockQuantized)."""
    import shutil

    from arx.calibration.graph import untie_lm_head
    from arx.calibration.embedding_quant import quantize_embedding
    from arx.calibration.weight_only import quantize_weight_only

    shutil.copytree(src, dst)
    m = read_manifest(dst)
    model = onnx.load(str(dst / m.decoder.file))
    tied = untie_lm_head(model)
    model = quantize_weight_only(model, bits=bits, group_size=32,
                                 accuracy_level=1, exclude=[])  # fp32 compute: comparable
    # as calibrate: a tied head's codes shared, else int4 codes of its own (at 8 bits: float)
    record = quantize_embedding(model, group_size=32, head="lm_head" if tied else None, bits=bits)
    if bits == 4 or tied:
        assert record["codes"] == ("shared with lm_head" if tied else "own")
    else:
        assert record is None
    onnx.save_model(model, str(dst / m.decoder.file), save_as_external_data=True,
                    location=m.decoder.file + ".data", all_tensors_to_one_file=True)
    m.extensions["quantization"] = {"scheme": f"w{bits}", "format": "MatMulNBits"}
    m.write(dst)
    return dst


def _unfused_session(model):
    """ORT without graph optimizations: it would fuse DequantizeLinear + MatMul back into a
    MatMulNBits whose default accuracy level quantizes activations (a different computation)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits, precision, atol, family", [
    (4, "fp32", 1e-4, "gemma"),  # tied: the embedding reads the head's codes
    (4, "fp32", 1e-4, "llama"),  # untied: a table of its own
    (8, "fp16", 5e-2, "llama"),  # untied at 8 bits: the table stays float
    (8, "fp16", 5e-2, "gemma")])  # tied: the int8 head's codes
def test_weight_only_bundle_builds_as_qdq_blocks(exported_bundle, tmp_path, bits, precision, atol,
                                                 family):
    """w4/w8 bundles build: MatMulNBits becomes DequantizeLinear(block) + MatMul, the same
    integers and scales, and w4's int4 embedding a Gather of the values its codes stand for,
    so the form gives the quantized bundle's own logits (fp32 compute on both sides);
    --precision int8 stays w8a8's."""
    bundle = _weight_only_bundle(exported_bundle(family), tmp_path / f"w{bits}.arx", bits)
    form = form_for(bundle, precision=precision, attention="native", sampler="argmax")
    ops = [n.op_type for n in form.proto.graph.node]
    assert "MatMulNBits" not in ops and ops.count("DequantizeLinear") == form.qdq_nodes > 0
    assert "GatherBlockQuantized" not in ops
    assert not [o for n in form.proto.graph.node for o in n.output if o.startswith("embed")
                and o.endswith(("/scales", "/blocks"))]  # the shared codes' views went too
    tables = [n.input[0] for n in form.proto.graph.node if n.op_type == "Gather"
              and n.input[1] == "input_ids"]
    assert len(tables) == 1 and tables[0].endswith(".table" if bits == 4 or family == "gemma"
                                                   else "embed_tokens.weight")
    steps = ragged_steps()
    expected = run_reference(bundle, steps)
    got = run_form(_unfused_session, form.proto, read_manifest(bundle), steps)
    for ref, (last, _) in zip(expected, got):
        np.testing.assert_allclose(last, ref, atol=atol, rtol=0)
    with pytest.raises(ArxError, match="--precision fp16"):
        form_for(bundle, precision="int8")


def test_low_precision_drops_stale_value_info(exported_bundle, tmp_path):
    """An exporter's recorded intermediate types (torch.onnx writes value_info) would contradict
    the fp16 graph and fail strict shape inference: the precision pass drops them."""
    import shutil

    from onnx import helper

    bundle = tmp_path / "llama.arx"
    shutil.copytree(exported_bundle("llama"), bundle)
    m = read_manifest(bundle)
    model = onnx.load(str(bundle / m.decoder.file))
    model.graph.value_info.append(helper.make_tensor_value_info(
        model.graph.node[0].output[0], onnx.TensorProto.FLOAT, None))
    onnx.save_model(model, str(bundle / m.decoder.file), save_as_external_data=True,
                    location=m.decoder.file + ".data", all_tensors_to_one_file=True)
    form = form_for(bundle, precision="fp16")
    assert not form.proto.graph.value_info
    onnx.checker.check_model(form.proto, full_check=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_form_keeps_the_weights_on_disk_until_it_is_saved(precision, exported_bundle, tmp_path):
    """No step holds the weights as one proto (the 2 GB protobuf limit, and a copy of the
    model): the form's big tensors are the bundle's memory-mapped ones (fp32) or lazy casts
    of them (fp16); the checks read a skeleton; save_form streams the tensors to the file."""
    import onnx_ir as ir
    from onnx import numpy_helper

    from arx.builder.form import FORM_DATA, FORM_FILE, save_form

    form = form_for(exported_bundle("llama"), precision=precision)
    big = [v.const_value for v in form.model.graph.initializers.values()
           if v.const_value.nbytes > 1024]
    kind = ir.ExternalTensor if precision == "fp32" else ir.LazyTensor
    assert big and all(isinstance(t, kind) for t in big)
    assert max(len(t.raw_data) for t in form.skeleton.graph.initializer) <= 1024
    assert save_form(form, tmp_path) == [FORM_FILE, FORM_DATA]
    saved = onnx.load(str(tmp_path / FORM_FILE))
    want = {t.name: numpy_helper.to_array(t) for t in form.proto.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    assert [n.SerializeToString() for n in saved.graph.node] == \
        [n.SerializeToString() for n in form.proto.graph.node]
