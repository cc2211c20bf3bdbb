"""Custom protocol modules get the fast path: plain cat + attention exports in place.

A module written the plain way (torch.cat of past and new, then scaled_dot_product_attention or
an explicit softmax, RoPE before the cat, fewer KV heads) or with arx.export.kv_attention
exports to the built-in families' form: GroupQueryAttention per layer, in-place cache, ragged
batches, multi-token steps with a past and the TensorRT form. What is not recognised still
exports, with the concatenating cache, and says why in one line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from custom_decoder import RopeGqaDecoder, module_greedy
from form_runs import form_for, run_form, run_reference

from arx.export.exporter import ExportOptions, export_model
from arx.export.protocol import SlowPathWarning
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate

QUIET = ExportOptions(progress=False)
PROMPTS = [[3, 14, 15, 92, 65, 35, 89], [79, 32], [38, 46, 26, 43]]  # batch 3, ragged
NEW_TOKENS = 24


def _export(tmp_path_factory, attention: str):
    folder = tmp_path_factory.mktemp(attention)
    torch.manual_seed(0)
    module = RopeGqaDecoder(attention).eval()
    torch.save(module, folder / "model.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SlowPathWarning)
        export_model(source=folder / "model.pt", output=folder / "m.arx", options=QUIET)
    notices = [str(w.message) for w in caught if w.category is SlowPathWarning]
    return module, folder / "m.arx", notices


@pytest.fixture(scope="module", params=["sdpa", "softmax", "kv_attention"])
def fast_bundle(request, tmp_path_factory):
    return _export(tmp_path_factory, request.param)


def _gqa_nodes(bundle) -> list[onnx.NodeProto]:
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def test_plain_attention_exports_in_place(fast_bundle):
    module, bundle, notices = fast_bundle
    m = read_manifest(bundle)
    assert not notices
    assert m.kv.update == "in_place" and m.family == "custom" and m.parity["passed"]
    assert [t.name for t in m.decoder.inputs][:4] == ["input_ids", "attention_mask",
                                                      "position_ids", "logits_indices"]
    nodes = _gqa_nodes(bundle)
    assert len(nodes) == m.kv.layers
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["num_heads"] == module.heads and attrs["kv_num_heads"] == module.kv_heads
        assert attrs["do_rotary"] == 0  # the module applied RoPE before the cat
        assert attrs["scale"] == pytest.approx(module.head_dim ** -0.5)
    assert "decoder_step" in m.stages and (bundle / "decoder_step.onnx").is_file()


def test_ragged_batch_of_three_is_token_identical_to_the_module(fast_bundle):
    module, bundle, _ = fast_bundle
    with DecoderSession(bundle) as session:
        got = generate(session, PROMPTS, GenerateOptions(max_new_tokens=NEW_TOKENS,
                                                         stop_on_eos=False))
    for prompt, tokens in zip(PROMPTS, got.tokens):
        assert tokens == module_greedy(module, prompt, NEW_TOKENS)


def _module_logits(module, prompt, new):
    """The module's logits for `new` after `prompt`, at batch 1 with its own cache."""
    spec = module.arx_decoder
    past = [tuple(torch.zeros(1, spec["num_kv_heads"], 0, spec["head_dim"]) for _ in "kv")
            for _ in range(spec["num_layers"])]
    with torch.no_grad():
        _, past = module(torch.tensor([prompt]), torch.arange(len(prompt))[None], past)
        pos = torch.arange(len(prompt), len(prompt) + len(new))[None]
        logits, _ = module(torch.tensor([new]), pos, past)
    return logits[0].numpy()


def test_multi_token_ragged_step_after_a_past(fast_bundle):
    module, bundle, _ = fast_bundle
    new = [[7, 8, 9], [10], [11, 12]]  # rows 3, 1 and 2 tokens wide, after pasts of 7, 2, 4
    ids = np.zeros((3, max(map(len, PROMPTS))), np.int64)
    for b, p in enumerate(PROMPTS):
        ids[b, :len(p)] = p
    step = np.zeros((3, 3), np.int64)
    for b, n in enumerate(new):
        step[b, :len(n)] = n
    with DecoderSession(bundle) as session:
        cache = session.new_cache(3, 32)
        session.step(cache, ids, np.array([len(p) for p in PROMPTS]), logits="none")
        got = session.step(cache, step, np.array([len(n) for n in new]))
    for b, (p, n) in enumerate(zip(PROMPTS, new)):
        np.testing.assert_allclose(got[b, :len(n)], _module_logits(module, p, n), atol=1e-4,
                                   err_msg=f"row {b}")


def _prefill_then_decode(prompts, decode_steps=4):
    """A ragged prefill, then single-token steps (tokens within the tiny vocabulary)."""
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    rng = np.random.default_rng(0)
    return [(ids, np.array([len(p) for p in prompts]))] + [
        (rng.integers(3, 90, (len(prompts), 1)), np.ones(len(prompts), np.int64))
        for _ in range(decode_steps)]


def test_tensorrt_form_and_kit_of_a_custom_bundle(fast_bundle, tmp_path):
    import onnxruntime as ort

    from arx.builder.build import build_bundle
    from arx.builder.form import FORM_FILE
    from arx.builder.options import BuildOptions

    _, bundle, _ = fast_bundle
    form = form_for(bundle)  # the plugin form arx build writes: GQA replaced by arx::kv_attention
    assert not [n for n in form.proto.graph.node if n.op_type == "GroupQueryAttention"]
    # the plugin-free form runs on ORT's own kernels: the bundle graph's logits, step by step
    native = form_for(bundle, attention="native", sampler="argmax")
    steps = _prefill_then_decode(PROMPTS)
    got = run_form(lambda m: ort.InferenceSession(m.SerializeToString()), native.proto,
                   read_manifest(bundle), steps)
    for i, (ref, (last, ids)) in enumerate(zip(run_reference(bundle, steps), got)):
        np.testing.assert_allclose(last, ref, atol=1e-4, rtol=0, err_msg=f"step {i}")
        np.testing.assert_array_equal(ids, ref.argmax(-1))
    copy = shutil.copytree(bundle, tmp_path / "m.arx")  # a build records itself in arx.json
    kit = build_bundle(copy, BuildOptions(target="h100", kit=True, max_seq_len=32, ptx=False,
                                          progress=False)).path
    assert (kit / FORM_FILE).is_file()


@pytest.mark.parametrize("attention, reason", [
    ("cache_length", "reads the past's length"),
    ("window", "is not the causal mask"),
])
def test_unrecognised_attention_exports_on_the_slow_path(tmp_path_factory, attention, reason):
    module, bundle, notices = _export(tmp_path_factory, attention)
    m = read_manifest(bundle)
    assert m.kv.update == "concat" and m.parity["passed"]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert reason in notices[0] and "arx.export.kv_attention" in notices[0]
    assert m.model["attention"]["path"] == "concat"
    with DecoderSession(bundle) as session:  # the slow path is still right, a row at a time
        got = generate(session, PROMPTS[:1], GenerateOptions(max_new_tokens=12, stop_on_eos=False))
    assert got.tokens[0] == module_greedy(module, PROMPTS[0], 12)


def test_is_causal_with_a_past_is_not_taken_for_the_causal_mask():
    from arx.export.fast_path import NotRecognised, trace_in_place
    from arx.manifest import KVLayout

    module = RopeGqaDecoder("is_causal").eval()
    kv = KVLayout(layers=2, kv_heads=2, head_dim=16, max_seq_len=128)
    with pytest.raises(NotRecognised, match="is_causal=True, which aligns the mask top-left"):
        trace_in_place(module, kv, [], [])


def test_kv_attention_is_the_plain_math():
    from arx.export import kv_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    pk, pv = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    out, k_all, v_all = kv_attention(q, k, v, pk, pv)
    assert torch.equal(k_all, torch.cat([pk, k], 2)) and torch.equal(v_all, torch.cat([pv, v], 2))
    for i in range(3):  # query i sees keys 0..5 + i, key head h // 2
        scores = q[:, :, i:i + 1] @ k_all.repeat_interleave(2, 1)[:, :, :6 + i].transpose(-1, -2)
        ref = (scores / 4).softmax(-1) @ v_all.repeat_interleave(2, 1)[:, :, :6 + i]
        torch.testing.assert_close(out[:, :, i:i + 1], ref)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kv_attention(q, k[:, :1].expand(2, 3, 3, 16).contiguous(), v[:, :1].expand(2, 3, 3, 16),
                     pk[:, :1].expand(2, 3, 5, 16), pv[:, :1].expand(2, 3, 5, 16))


def test_kv_attention_loads_torch_only_when_used():
    code = ("import sys, arx, arx.export\n"
            "assert 'torch' not in sys.modules\n"
            "from arx.export import kv_attention\n"
            "assert 'torch' in sys.modules and callable(kv_attention)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
