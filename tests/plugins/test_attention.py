"""arx::kv_attention: the reference against textbook attention, the Triton kernel (interpreter)
against the reference. Tolerances: fp32 2e-5 (reference vs float64 naive: 1e-5), fp16 2e-3,
bf16 2e-2 absolute on outputs of magnitude ~1; cache writes must be exact."""

import os
import zlib

import numpy as np
import pytest

from arx.plugins.attention.reference import (AttentionOptions, kv_attention_reference,
                                             naive_attention)

TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}


def make_case(seed, b, s_new, hq, hkv, s_max, d, full_new=False):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    case = dict(q=f(b, s_new, hq, d), k_new=f(b, s_new, hkv, d), v_new=f(b, s_new, hkv, d),
                k_cache=f(b, hkv, s_max, d), v_cache=f(b, hkv, s_max, d))
    new_len = np.full(b, s_new, np.int32) if full_new else rng.integers(0, s_new + 1, b)
    new_len[0] = s_new  # at least one full row
    case["new_len"] = new_len.astype(np.int32)
    case["past_len"] = np.array([rng.integers(0, s_max - n + 1) for n in case["new_len"]],
                                np.int32)
    return case


@pytest.mark.parametrize("mask", ["causal", "block"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
def test_reference_matches_textbook_attention(mask, hq, hkv):
    c = make_case(1, 2, 5, hq, hkv, 19, 16, full_new=True)
    k_cache, v_cache = c["k_cache"].copy(), c["v_cache"].copy()
    out = kv_attention_reference(c["q"], c["k_new"], c["v_new"], k_cache, v_cache,
                                 c["past_len"], c["new_len"], AttentionOptions(mask=mask))
    for b in range(2):
        p = int(c["past_len"][b])
        keys = np.concatenate([c["k_cache"][b, :, :p].transpose(1, 0, 2), c["k_new"][b]])
        vals = np.concatenate([c["v_cache"][b, :, :p].transpose(1, 0, 2), c["v_new"][b]])
        want = naive_attention(c["q"][b], keys, vals, 0.25, p if mask == "causal" else None)
        np.testing.assert_allclose(out[b], want, atol=1e-5)
        np.testing.assert_array_equal(k_cache[b, :, p:p + 5], c["k_new"][b].transpose(1, 0, 2))


def test_reference_padding_contract():
    c = make_case(2, 3, 6, 4, 2, 20, 8)
    c["new_len"][:] = [6, 2, 0]
    before = c["k_cache"].copy()
    out = kv_attention_reference(c["q"], c["k_new"], c["v_new"], c["k_cache"], c["v_cache"],
                                 c["past_len"], c["new_len"])
    assert np.all(out[1, 2:] == 0) and np.all(out[2] == 0)  # padded query rows are zeros
    p = int(c["past_len"][1])
    untouched = np.ones(20, bool)
    untouched[p:p + 2] = False
    np.testing.assert_array_equal(c["k_cache"][1][:, untouched], before[1][:, untouched])
    np.testing.assert_array_equal(c["k_cache"][2], before[2])  # nothing written for new_len 0


@pytest.mark.parametrize("mask", ["causal", "block"])
@pytest.mark.parametrize("window", [1, 3, 8, 30])
def test_reference_window_matches_textbook_attention(mask, window):
    """Window W: query at absolute position p sees keys j > p - W (W keys when causal)."""
    c = make_case(4, 2, 6, 4, 2, 24, 16, full_new=True)
    c["past_len"][:] = [9, 0]  # window shorter than the past, and a first prompt
    k_cache, v_cache = c["k_cache"].copy(), c["v_cache"].copy()
    out = kv_attention_reference(c["q"], c["k_new"], c["v_new"], k_cache, v_cache,
                                 c["past_len"], c["new_len"],
                                 AttentionOptions(mask=mask, window=window))
    for b in range(2):
        p = int(c["past_len"][b])
        keys = np.concatenate([c["k_cache"][b, :, :p].transpose(1, 0, 2), c["k_new"][b]])
        vals = np.concatenate([c["v_cache"][b, :, :p].transpose(1, 0, 2), c["v_new"][b]])
        want = naive_attention(c["q"][b], keys, vals, 0.25, p if mask == "causal" else None,
                               window=window, past=p)
        np.testing.assert_allclose(out[b], want, atol=1e-5)


def test_window_one_is_the_own_value():
    """Causal window 1: every query sees only its own key, so out = its own value."""
    c = make_case(5, 1, 4, 2, 2, 12, 8, full_new=True)
    out = kv_attention_reference(c["q"], c["k_new"], c["v_new"], c["k_cache"], c["v_cache"],
                                 c["past_len"], c["new_len"], AttentionOptions(window=1))
    np.testing.assert_allclose(out[0], c["v_new"][0], atol=1e-6)


def test_options_validate():
    with pytest.raises(ValueError, match="mask"):
        AttentionOptions(mask="sliding")
    for bad in (-1, 2.5, 2**31):
        with pytest.raises(ValueError, match="window"):
            AttentionOptions(window=bad)
    with pytest.raises(ValueError, match="multiple"):
        kv_attention_reference(*[np.zeros(s, np.float32) for s in
                                 [(1, 1, 3, 8), (1, 1, 2, 8), (1, 1, 2, 8), (1, 2, 4, 8),
                                  (1, 2, 4, 8)]], np.zeros(1, np.int32), np.ones(1, np.int32))


# Shapes: (B, S_new, Hq, Hkv, S_max, D, num_splits). Odd sizes on purpose.
TRITON_CASES = [
    (2, 1, 4, 4, 37, 64, 1),     # decode, MHA, S_max not a power of two
    (3, 1, 8, 2, 100, 64, 4),    # decode GQA 4, flash-decoding split
    (2, 1, 6, 1, 45, 80, 2),     # decode MQA, D = 80 (padded to 128 in the tile)
    (2, 7, 4, 2, 50, 64, 1),     # prefill/verify block of 7, GQA 2
    (2, 33, 2, 1, 70, 64, 1),    # prefill 33 (spans M tiles), MQA
    (2, 7, 4, 2, 40, 64, 2),     # multi-token block with the split kernels
]


def _triton_and_reference(torch, kv_attention, c, opts, splits):
    """Run the reference on numpy copies and the Triton kernel on torch copies of case `c`;
    returns (kernel out, reference out, the kernel's tensors, the reference's caches)."""
    ref_cache = c["k_cache"].copy(), c["v_cache"].copy()
    want = kv_attention_reference(c["q"], c["k_new"], c["v_new"], *ref_cache, c["past_len"],
                                  c["new_len"], opts)
    t = {k: torch.from_numpy(v.copy()) for k, v in c.items()}
    got = kv_attention(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"],
                       t["past_len"], t["new_len"], opts, num_splits=splits)
    return got, want, t, ref_cache

@pytest.mark.parametrize("mask", ["causal", "block"])
@pytest.mark.parametrize("shape", TRITON_CASES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(torch, triton, shape, mask):
    from arx.plugins.attention.triton_kernel import kv_attention

    *dims, splits = shape
    c = make_case(hash((shape, mask)) % 1000, *dims)
    got, want, t, ref_cache = _triton_and_reference(torch, kv_attention, c,
                                                    AttentionOptions(mask=mask), splits)
    np.testing.assert_allclose(got.numpy(), want, atol=TOL["float32"], rtol=0)
    np.testing.assert_array_equal(t["k_cache"].numpy(), ref_cache[0])
    np.testing.assert_array_equal(t["v_cache"].numpy(), ref_cache[1])


# (B, S_new, Hq, Hkv, S_max, D, num_splits, past_len, window, mask): the window cut lands before
# the past (decode), inside a key tile, across the new block, and over M tiles.
WINDOW_CASES = [
    (2, 1, 4, 2, 90, 64, 1, 70, 20, "causal"),   # decode, window < past
    (2, 1, 8, 2, 300, 64, 4, 260, 100, "causal"),  # decode, split kernel over the window only
    (2, 1, 4, 4, 40, 64, 2, 39, 1, "causal"),    # window 1: only the new token itself
    (2, 7, 4, 2, 60, 64, 1, 30, 5, "causal"),    # window shorter than the new block
    (1, 33, 2, 1, 80, 64, 1, 20, 10, "causal"),  # prefill over 2 M tiles, straddling window
    (1, 40, 2, 2, 40, 32, 1, 0, 16, "causal"),   # first prompt longer than the window
    (2, 7, 4, 2, 60, 64, 1, 30, 5, "block"),     # block mask + window (later block keys stay)
    (2, 7, 4, 2, 60, 64, 2, 40, 12, "block"),    # block mask + window, split kernels
    (2, 5, 4, 2, 40, 64, 1, 10, 100, "causal"),  # window longer than everything: no effect
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_window_matches_reference(torch, triton, case):
    from arx.plugins.attention.triton_kernel import kv_attention

    *dims, splits, past, window, mask = case
    c = make_case(window, *dims)
    c["new_len"][1:] = np.minimum(c["new_len"][1:], dims[4] - past)  # ragged rows, in range
    c["past_len"][:] = past
    c["past_len"][1:] = np.minimum(past, dims[4] - c["new_len"][1:]) // 2  # another length
    opts = AttentionOptions(mask=mask, window=window, scale=0.2)
    got, want, t, ref_cache = _triton_and_reference(torch, kv_attention, c, opts, splits)
    np.testing.assert_allclose(got.numpy(), want, atol=TOL["float32"], rtol=0)
    np.testing.assert_array_equal(t["k_cache"].numpy(), ref_cache[0])


def test_triton_window_actually_masks(torch, triton):
    """The window changes the decode output (guards against a window that is ignored)."""
    from arx.plugins.attention.triton_kernel import kv_attention

    c = make_case(9, 1, 1, 2, 1, 64, 32, full_new=True)
    c["past_len"][:] = 50
    outs = []
    for window in (0, 8):
        t = {k: torch.from_numpy(v.copy()) for k, v in c.items()}
        outs.append(kv_attention(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"],
                                 t["past_len"], t["new_len"], AttentionOptions(window=window)))
    assert (outs[0] - outs[1]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_triton_low_precision(torch, triton, dtype):
    from arx.plugins.attention.triton_kernel import kv_attention

    c = make_case(7, 2, 3, 4, 2, 30, 64)
    tdt = getattr(torch, dtype)
    t = {k: torch.from_numpy(v.copy()) for k, v in c.items()}
    for k in ("q", "k_new", "v_new", "k_cache", "v_cache"):
        t[k] = t[k].to(tdt)
    # the reference sees the same rounded inputs, in fp32
    r = {k: (v.to(torch.float32).numpy().copy() if v.dtype == tdt else v.numpy())
         for k, v in t.items()}
    want = kv_attention_reference(r["q"], r["k_new"], r["v_new"], r["k_cache"], r["v_cache"],
                                  r["past_len"], r["new_len"], AttentionOptions(scale=0.1))
    got = kv_attention(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"],
                       t["past_len"], t["new_len"], AttentionOptions(scale=0.1))
    assert got.dtype == tdt
    np.testing.assert_allclose(got.to(torch.float32).numpy(), want, atol=TOL[dtype], rtol=0)
    np.testing.assert_array_equal(t["k_cache"].to(torch.float32).numpy(), r["k_cache"])


def test_interpreter_bf16_dot_bug(torch, triton):
    """Triton 3.9's interpreter gets tl.dot on bf16 tiles wrong, so the attention kernel widens
    bf16 tiles to fp32 before its dots when interpreted (triton_kernel.INTERPRETED). When this
    test fails, Triton fixed the bug: drop the widening."""
    import triton.language as tl

    @triton.jit
    def dot16(X, Y, OUT):
        i = tl.arange(0, 16)
        tile = i[:, None] * 16 + i[None, :]
        tl.store(OUT + tile, tl.dot(tl.load(X + tile), tl.load(Y + tile)))

    x, y = (torch.randn(16, 16).to(torch.bfloat16) for _ in range(2))
    out = torch.zeros(16, 16)
    dot16[(1,)](x, y, out)
    assert (out - x.float() @ y.float()).abs().max() > 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_triton_on_gpu(torch, triton, dtype):
    """On a CUDA GPU (run without TRITON_INTERPRET): decode and prefill against the reference,
    with and without a sliding window."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET unset")
    from arx.plugins.attention.triton_kernel import kv_attention

    tdt = getattr(torch, dtype)
    cases = [((4, 1, 32, 8, 1000, 128), AttentionOptions()),
             ((2, 65, 16, 4, 300, 64), AttentionOptions()),
             ((4, 1, 32, 8, 1000, 128), AttentionOptions(window=100, scale=0.05)),  # split-K
             ((2, 65, 16, 4, 300, 64), AttentionOptions(window=40)),
             ((2, 9, 16, 4, 300, 64), AttentionOptions(mask="block", window=30))]
    for shape, opts in cases:
        c = make_case(3, *shape)
        t = {k: torch.from_numpy(v.copy()).cuda() for k, v in c.items()}
        for k in ("q", "k_new", "v_new", "k_cache", "v_cache"):
            t[k] = t[k].to(tdt)
        r = {k: v.float().cpu().numpy().copy() if v.dtype == tdt else v.cpu().numpy()
             for k, v in t.items()}
        want = kv_attention_reference(r["q"], r["k_new"], r["v_new"], r["k_cache"],
                                      r["v_cache"], r["past_len"], r["new_len"], opts)
        got = kv_attention(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"],
                           t["past_len"], t["new_len"], opts)
        np.testing.assert_allclose(got.float().cpu().numpy(), want, atol=TOL[dtype], rtol=0)


# ------------------------------------------------------------------ fp16 and int8 caches
def _gqa_int8_session(hq, hkv, d, s_max, scales):
    """One onnxruntime GroupQueryAttention node with the int8 cache `arx export --kv-dtype int8`
    gives it (export/kv_dtype.retype_decoder: PER_CHANNEL scales, quantized when written)."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h

    from arx.export.kv_dtype import retype_decoder
    from arx.manifest import KVLayout

    kv = KVLayout(1, hkv, d, s_max)
    (past, present), = [((kv.past_key.format(i=0), kv.past_value.format(i=0)),
                         (kv.present_key.format(i=0), kv.present_value.format(i=0)))]
    ins = [h.make_tensor_value_info(n, TP.FLOAT, ["B", "S", w * d])
           for n, w in (("q", hq), ("k", hkv), ("v", hkv))]
    ins += [h.make_tensor_value_info("seqlens_k", TP.INT32, ["B"]),
            h.make_tensor_value_info("total", TP.INT32, [])]
    ins += [h.make_tensor_value_info(p, TP.FLOAT, ["B", hkv, s_max, d]) for p in past]
    node = h.make_node("GroupQueryAttention", ["q", "k", "v", *past, "seqlens_k", "total"],
                       ["out", *present], domain="com.microsoft", num_heads=hq, kv_num_heads=hkv)
    outs = [h.make_tensor_value_info(n, TP.FLOAT, None) for n in ("out", *present)]
    m = h.make_model(h.make_graph([node], "gqa", ins, outs),
                     opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    retype_decoder(m, kv, "int8", dict(zip(past, scales)))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]), past


@pytest.mark.parametrize("b,s,pasts", [(2, 1, [5, 9]), (1, 3, [4])])
def test_reference_int8_cache_is_onnxruntimes(b, s, pasts):
    """The spec's int8 cache is the one the bundle runs on ORT: the same codes written
    (ties to even, saturation included) and the same attention over the decoded cache."""
    hq, hkv, d, s_max = 4, 2, 16, 20
    rng = np.random.default_rng(0)
    scales = [rng.uniform(0.01, 0.05, (hkv, 1, d)).astype(np.float32) for _ in range(2)]
    session, past = _gqa_int8_session(hq, hkv, d, s_max, scales)
    q, k, v = (rng.standard_normal((b, s, w * d)).astype(np.float32) for w in (hq, hkv, hkv))
    k[0, 0, :4] = scales[0][0, 0, :4] * np.float32([0.5, 1.5, 2.5, 400])  # ties, saturation
    caches = [rng.integers(-128, 128, (b, hkv, s_max, d)).astype(np.int8) for _ in range(2)]
    pasts = np.array(pasts, np.int32)
    out, *present = session.run(None, {"q": q, "k": k, "v": v, "seqlens_k": pasts + s - 1,
                                       "total": np.array(pasts.max() + s, np.int32),
                                       past[0]: caches[0], past[1]: caches[1]})
    mine = [c.copy() for c in caches]
    want = kv_attention_reference(q.reshape(b, s, hq, d), k.reshape(b, s, hkv, d),
                                  v.reshape(b, s, hkv, d), *mine, pasts, np.full(b, s, np.int32),
                                  k_scale=scales[0], v_scale=scales[1])
    assert list(mine[0][0, 0, pasts[0], :4]) == [0, 2, 2, 127]
    for i in range(b):
        for got, ref in zip(present, mine):
            np.testing.assert_array_equal(got[i, :, :pasts[i] + s], ref[i, :, :pasts[i] + s])
    np.testing.assert_allclose(out.reshape(b, s, hq, d), want, atol=1e-5, rtol=0)


def test_reference_cache_dtype_rules():
    c = make_case(11, 1, 2, 2, 1, 8, 8)
    half = {k: c[k].astype(np.float16) for k in ("q", "k_new", "v_new")}
    with pytest.raises(ValueError, match="caches hold q's dtype"):  # fp32 cache, fp16 engine
        kv_attention_reference(*half.values(), c["k_cache"], c["v_cache"], c["past_len"])
    codes = np.zeros((1, 1, 8, 8), np.int8)
    with pytest.raises(ValueError, match="needs k_scale"):
        kv_attention_reference(c["q"], c["k_new"], c["v_new"], codes, codes.copy(), c["past_len"])
    with pytest.raises(ValueError, match=r"\(1, 1, 8\)"):
        kv_attention_reference(c["q"], c["k_new"], c["v_new"], codes, codes.copy(), c["past_len"],
                               k_scale=np.ones(4, np.float32), v_scale=np.ones(8, np.float32))


# (activation dtype, cache dtype) beside each precision's own cache (trt_contract.CACHE_COMBOS)
CACHE_COMBOS = [("float32", "float16"), ("bfloat16", "float16"), ("float32", "int8"),
                ("float16", "int8"), ("bfloat16", "int8")]
# (B, S_new, Hq, Hkv, S_max, D, num_splits, mask, window): decode with the split kernels, GQA 4;
# MQA prefill over M tiles; a block of 7 with the split kernels; causal window inside the past
CACHE_SHAPES = [(3, 1, 8, 2, 100, 64, 4, "causal", 0), (2, 33, 2, 1, 70, 64, 1, "causal", 0),
                (2, 7, 4, 2, 40, 64, 2, "block", 0), (2, 5, 4, 2, 60, 80, 1, "causal", 12)]


def _cache_case(torch, seed, dims, act, cache):
    """make_case with the caches in `cache` (int8: codes of random per-channel scales, the new
    values reaching past 127 steps on some channels) and q/k_new/v_new in `act`; returns
    (torch tensors, numpy copies for the reference: the activations' rounded values in fp32)."""
    c = make_case(seed, *dims)
    rng = np.random.default_rng(seed)
    hkv, d = dims[3], dims[5]
    scales = {}
    for name in ("k", "v"):
        if cache == "int8":
            scales[f"{name}_scale"] = rng.uniform(0.01, 0.04, (hkv, 1, d)).astype(np.float32)
            codes = np.rint(c[f"{name}_cache"] / scales[f"{name}_scale"])
            c[f"{name}_cache"] = np.clip(codes, -128, 127).astype(np.int8)
        else:
            c[f"{name}_cache"] = c[f"{name}_cache"].astype(cache)
    t = {k: torch.from_numpy(v.copy()) for k, v in {**c, **scales}.items()}
    for k in ("q", "k_new", "v_new"):
        t[k] = t[k].to(getattr(torch, act))
    r = {k: v.to(torch.float32).numpy().copy() if k in ("q", "k_new", "v_new") else v.numpy().copy()
         for k, v in t.items()}
    return t, r


@pytest.mark.parametrize("shape", CACHE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act,cache", CACHE_COMBOS, ids=lambda x: x)
def test_triton_reads_fp16_and_int8_caches(torch, triton, act, cache, shape):
    """fp16 caches in fp32/bf16 engines and int8 caches in every precision, over ragged rows
    (per-sequence past and new lengths), GQA/MQA, both masks, a window and the split kernels:
    the written cache equals the reference's exactly (int8 codes included), outputs within the
    activation dtype's tolerance."""
    from arx.plugins.attention.triton_kernel import kv_attention

    *dims, splits, mask, window = shape
    t, r = _cache_case(torch, zlib.crc32(repr((shape, act, cache)).encode()), dims, act, cache)
    opts = AttentionOptions(mask=mask, window=window)
    scales = {k: r[k] for k in ("k_scale", "v_scale") if k in r}
    want = kv_attention_reference(r["q"], r["k_new"], r["v_new"], r["k_cache"], r["v_cache"],
                                  r["past_len"], r["new_len"], opts, **scales)
    got = kv_attention(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"], t["past_len"],
                       t["new_len"], opts, num_splits=splits,
                       **{k: t[k] for k in ("k_scale", "v_scale") if k in t})
    assert got.dtype == getattr(torch, act) and t["k_cache"].dtype == getattr(torch, cache)
    # bf16 + int8: the decoded values are rounded to bf16 for the dots (the reference keeps
    # them in fp32), on top of the output's own bf16 rounding (measured up to 1.8e-2)
    tol = 3e-2 if (act, cache) == ("bfloat16", "int8") else TOL[act]
    np.testing.assert_allclose(got.to(torch.float32).numpy(), want, atol=tol, rtol=0)
    np.testing.assert_array_equal(t["k_cache"].numpy(), r["k_cache"])
    np.testing.assert_array_equal(t["v_cache"].numpy(), r["v_cache"])


def test_triton_int8_cache_is_dequantized(torch, triton):
    """The int8 scales reach the attention: the same codes under doubled value scales give
    doubled outputs (guards against codes read as values, or scales read for one side)."""
    from arx.plugins.attention.triton_kernel import kv_attention

    t, _ = _cache_case(torch, 5, (1, 1, 4, 2, 40, 32), "float32", "int8")
    t["past_len"][:] = 30
    t["v_new"].zero_()  # code 0 under any scale: only the cached values scale
    outs = []
    for factor in (1.0, 2.0):
        c = {k: v.clone() for k, v in t.items()}
        outs.append(kv_attention(c["q"], c["k_new"], c["v_new"], c["k_cache"], c["v_cache"],
                                 c["past_len"], c["new_len"], k_scale=c["k_scale"],
                                 v_scale=c["v_scale"] * factor))
    np.testing.assert_allclose(outs[1].numpy(), 2 * outs[0].numpy(), rtol=1e-4, atol=1e-5)


def test_triton_cache_refusals(torch, triton):
    from arx.plugins.attention.triton_kernel import kv_attention

    t, _ = _cache_case(torch, 6, (1, 1, 2, 1, 8, 16), "float32", "int8")
    args = [t[k] for k in ("q", "k_new", "v_new", "k_cache", "v_cache", "past_len", "new_len")]
    with pytest.raises(ValueError, match="needs k_scale"):
        kv_attention(*args)
    args[3:5] = [torch.zeros(1, 1, 8, 16, dtype=torch.float32) for _ in range(2)]
    args[0:3] = [a.to(torch.float16) for a in args[0:3]]
    with pytest.raises(ValueError, match="fp16 cache, fp16 or int8 with fp16"):
        kv_attention(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("act,cache", CACHE_COMBOS, ids=lambda x: x)
def test_triton_caches_on_gpu(torch, triton, act, cache):
    """On a CUDA GPU (without TRITON_INTERPRET): the cache pairs compiled, decode (split-K)
    and prefill with a window, against the reference; the written caches exact."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET unset")
    from arx.plugins.attention.triton_kernel import kv_attention

    for dims, opts in [((4, 1, 32, 8, 1000, 128), AttentionOptions()),
                       ((2, 65, 16, 4, 300, 64), AttentionOptions(window=40))]:
        t, r = _cache_case(torch, 3, dims, act, cache)
        t = {k: v.cuda() for k, v in t.items()}
        scales = {k: r[k] for k in ("k_scale", "v_scale") if k in r}
        want = kv_attention_reference(r["q"], r["k_new"], r["v_new"], r["k_cache"],
                                      r["v_cache"], r["past_len"], r["new_len"], opts, **scales)
        got = kv_attention(t["q"], t["k_new"], t["v_new"], t["k_cache"], t["v_cache"],
                           t["past_len"], t["new_len"], opts,
                           **{k: t[k] for k in ("k_scale", "v_scale") if k in t})
        tol = 3e-2 if (act, cache) == ("bfloat16", "int8") else TOL[act]
        tol = 5e-3 if act == "float32" else tol  # compiled fp32 dots are TF32 (Triton's default)
        np.testing.assert_allclose(got.float().cpu().numpy(), want, atol=tol, rtol=0)
        np.testing.assert_array_equal(t["k_cache"].cpu().numpy(), r["k_cache"])
