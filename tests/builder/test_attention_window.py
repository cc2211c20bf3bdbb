"""onnxruntime's GroupQueryAttention against the arx::kv_attention reference, op by op.

The graph pass maps GQA's `local_window_size = W` to the plugin's `window = W` and GQA's `scale`
to `scale`. This pins both mappings on the ORT op itself (CPU): a one-node GQA graph with a
shared past buffer (B, Hkv, cap, D), as the bundles use it, against kv_attention_reference.
Tolerance: 1e-5 abs on outputs of magnitude ~1 (fp32, two implementations of the same sums).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from arx.plugins import AttentionOptions, kv_attention_reference

HQ, HKV, D, CAP = 4, 2, 8, 32


def _gqa_session(b: int, s: int, window: int, scale: float):
    import onnxruntime as ort

    attrs = dict(num_heads=HQ, kv_num_heads=HKV, local_window_size=window)
    if scale:
        attrs["scale"] = scale
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k",
                                                    "total"], ["o", "ok", "ov"],
                            domain="com.microsoft", **attrs)
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, [b, s, HQ * D]),
              helper.make_tensor_value_info("k", f, [b, s, HKV * D]),
              helper.make_tensor_value_info("v", f, [b, s, HKV * D]),
              helper.make_tensor_value_info("pk", f, [b, HKV, CAP, D]),
              helper.make_tensor_value_info("pv", f, [b, HKV, CAP, D]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [b]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# (new tokens S, past lengths per row, local_window_size, GQA scale attribute (0 = default))
CASES = [
    (10, [0], 3, 0.0),        # first prompt longer than the window
    (1, [20, 9], 3, 0.0),     # decode, window far shorter than the past, ragged batch
    (4, [6], 3, 0.0),         # a block after a past, window inside the block
    (5, [12], 1, 0.0),        # window 1: only the own key
    (1, [15, 4], 8, 0.3),     # custom scale (ORT: a batch > 1 with a past decodes 1 token)
    (6, [4], -1, 0.0),        # no window (GQA's -1 = the plugin's 0)
]


@pytest.mark.parametrize("s,pasts,window,scale", CASES)
def test_gqa_window_and_scale_match_the_plugin_reference(s, pasts, window, scale):
    b = len(pasts)
    rng = np.random.default_rng(s * 100 + window)
    q = rng.standard_normal((b, s, HQ, D)).astype(np.float32)
    k = rng.standard_normal((b, s, HKV, D)).astype(np.float32)
    v = rng.standard_normal((b, s, HKV, D)).astype(np.float32)
    cache_k = rng.standard_normal((b, HKV, CAP, D)).astype(np.float32)
    cache_v = rng.standard_normal((b, HKV, CAP, D)).astype(np.float32)
    past = np.array(pasts, np.int32)
    feeds = dict(q=q.reshape(b, s, -1), k=k.reshape(b, s, -1), v=v.reshape(b, s, -1),
                 pk=cache_k, pv=cache_v, seqlens_k=past + s - 1,  # ORT: total length - 1
                 total=np.array(past.max() + s, np.int32))
    out, present_k, _ = _gqa_session(b, s, window, scale).run(None, feeds)
    ref_k, ref_v = cache_k.copy(), cache_v.copy()
    want = kv_attention_reference(q, k, v, ref_k, ref_v, past, np.full(b, s, np.int32),
                                  AttentionOptions(scale=scale, window=max(window, 0)))
    np.testing.assert_allclose(out.reshape(want.shape), want, atol=1e-5, rtol=0)
    for i, p in enumerate(pasts):  # the cache rows written by both
        np.testing.assert_array_equal(present_k[i, :, :p + s], ref_k[i, :, :p + s])


def test_gqa_window_off_by_one_is_visible():
    """Windows W - 1 and W + 1 give other outputs: the comparison above has teeth."""
    rng = np.random.default_rng(0)
    b, s = 1, 12
    q = rng.standard_normal((b, s, HQ, D)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, HKV, D)).astype(np.float32) for _ in range(2))
    cache = np.zeros((b, HKV, CAP, D), np.float32)
    feeds = dict(q=q.reshape(b, s, -1), k=k.reshape(b, s, -1), v=v.reshape(b, s, -1),
                 pk=cache, pv=cache, seqlens_k=np.array([s - 1], np.int32),
                 total=np.array(s, np.int32))
    out = _gqa_session(b, s, 4, 0.0).run(None, feeds)[0].reshape(q.shape)
    for w in (3, 5):
        other = kv_attention_reference(q, k, v, cache.copy(), cache.copy(), np.zeros(1, np.int32),
                                       None, AttentionOptions(window=w))
        assert np.abs(other - out).max() > 1e-2
