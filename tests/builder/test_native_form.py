"""The plugin-free TensorRT form (--attention native --sampler argmax) of every family.

ONNX Attention + TensorScatter (opset 24) run on ONNX Runtime's own CPU kernels here, against
the bundle's graph on the same ragged prefill + decode steps: fp32 logits within 1e-4 and the
in-graph ArgMax equal to the reference argmax, fp16 within 5e-2; Mistral past its sliding window;
and the cache written in place when present.i.* is bound to past_key_values.i.*'s buffer.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from form_runs import S_MAX, form_for, ragged_steps, run_form, run_reference, window_steps

from arx.manifest import read_manifest

NATIVE = {"attention": "native", "sampler": "argmax"}


def test_native_form_has_no_plugin_nodes(family, exported_bundle):
    bundle = exported_bundle(family)
    form = form_for(bundle, precision="fp16", **NATIVE)
    layers = read_manifest(bundle).kv.layers
    ops = [n.op_type for n in form.proto.graph.node]
    assert {n.domain for n in form.proto.graph.node} == {""}
    assert {o.domain: o.version for o in form.proto.opset_import} == {"": 24}
    assert ops.count("Attention") == layers and ops.count("TensorScatter") == 2 * layers
    onnx.checker.check_model(form.proto, full_check=True)
    assert not any(t.name in ("sampling_params", "presence", "seed", "offset", "row")
                   for t in form.stage.inputs)
    assert [t.name for t in form.stage.outputs][:2] == ["token_ids", "last_logits"]


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 5e-2)])
def test_native_form_numerics_match_bundle(family, exported_bundle, ort_session, precision, atol):
    bundle = exported_bundle(family)
    steps = ragged_steps()
    expected = run_reference(bundle, steps)
    form = form_for(bundle, precision=precision, **NATIVE)
    got = run_form(ort_session, form.proto, read_manifest(bundle), steps)
    for i, (ref, (last, ids)) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(last, ref, atol=atol, rtol=0, err_msg=f"{family} step {i}")
        np.testing.assert_array_equal(ids, last.argmax(-1))
        if precision == "fp32":
            np.testing.assert_array_equal(ids, ref.argmax(-1))


def test_native_sliding_window_beyond_the_window(exported_bundle, ort_session):
    s_max = 48
    bundle = exported_bundle("mistral")
    form = form_for(bundle, max_seq_len=s_max, **NATIVE)
    steps = window_steps()
    expected = run_reference(bundle, steps, s_max)
    got = run_form(ort_session, form.proto, read_manifest(bundle), steps,
                   s_max=s_max)
    for i, (ref, (last, ids)) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(last, ref, atol=1e-4, rtol=0, err_msg=f"step {i}")
        np.testing.assert_array_equal(ids, ref.argmax(-1))


def test_native_and_plugin_sampler_mix(exported_bundle, ort_session):
    """Native attention with the arx::sample plugin: the sampler inputs come back."""
    bundle = exported_bundle("llama")
    form = form_for(bundle, attention="native", sampler="plugin")
    assert [n.op_type for n in form.proto.graph.node if n.domain == "arx"] == ["sample"]
    assert "sampling_params" in [t.name for t in form.stage.inputs]
    steps = ragged_steps()[:2]
    got = run_form(ort_session, form.proto, read_manifest(bundle), steps)
    for ref, (last, ids) in zip(run_reference(bundle, steps), got):
        np.testing.assert_array_equal(ids, ref.argmax(-1))


def test_native_cache_written_in_place(exported_bundle):
    """Each present.i.* bound to its past_key_values.i.* buffer (as the TensorRT runtime binds
    them): the step writes the new keys/values into that very buffer, and the logits match the
    run that copies the cache."""
    import onnxruntime as ort

    bundle = exported_bundle("qwen2")
    m = read_manifest(bundle)
    form = form_for(bundle, **NATIVE)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(form.proto.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    steps = ragged_steps()
    b, kv = len(steps[0][1]), m.kv
    caches = {p: np.zeros((b, kv.kv_heads, S_MAX, kv.head_dim), np.float32) for p, _ in kv.pairs()}
    values = {p: ort.OrtValue.ortvalue_from_numpy(c) for p, c in caches.items()}
    lengths, expected = np.zeros(b, np.int64), run_reference(bundle, steps)
    for (ids, lens), ref in zip(steps, expected):
        binding = session.io_binding()
        totals = lengths + lens
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("past_lengths", lengths)
        binding.bind_cpu_input("new_lengths", np.asarray(lens, np.int64))
        binding.bind_output("last_logits")  # the first bound output
        for past, present in kv.pairs():
            binding.bind_ortvalue_input(past, values[past])
            binding.bind_ortvalue_output(present, values[past])
        binding.bind_output("token_ids")
        session.run_with_iobinding(binding)
        last = binding.get_outputs()[0].numpy()
        np.testing.assert_allclose(last, ref, atol=1e-4, rtol=0)
        lengths = totals
    first = caches[kv.pairs()[0][0]]  # the numpy array behind the bound buffer
    assert np.abs(first[0, :, :lengths[0]]).sum() > 0  # keys written into it, in place
    assert not first[0, :, lengths[0]:].any()  # and nothing past the sequence


def test_native_form_bf16_keeps_softmax_in_fp32(exported_bundle):
    """bf16 casts the weights and the cache; Attention keeps softmax_precision = FLOAT."""
    form = form_for(exported_bundle("gpt2"), precision="bf16", **NATIVE)
    attention = [n for n in form.proto.graph.node if n.op_type == "Attention"]
    assert attention and all(onnx.helper.get_attribute_value(a) == onnx.TensorProto.FLOAT
                             for n in attention for a in n.attribute if a.name == "softmax_precision")
    assert {t.dtype for t in form.stage.inputs if t.name.startswith("past_key_values")} == {"bfloat16"}
