"""arx::kv_attention: the reference against textbook attention, the Triton kernel (interpreter)
against the reference. Tolerances: fp32 2e-5 (reference vs float64 naive: 1e-5), fp16 2e-3,
bf16 2e-2 absolute on outputs of magnitude ~1; cache writes must be exact."""

import os

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
