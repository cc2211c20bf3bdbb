"""DecoderSession.step beyond decode and prefill: multi-token ragged steps after a past at
batch 3, causal and block masks, against PyTorch (the Hugging Face model over each row's whole
sequence with an explicit 4D mask); rollback then re-decode equal to never having decoded;
logits at chosen positions; bundles that cannot take such steps say why."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from arx.errors import ArxError
from arx.runtime.decoder import DecoderSession

ATOL = 1e-4  # fp32 graph vs fp32 PyTorch; greedy-relevant logits are O(10) here
# (new tokens per row, mask) of each step after a ragged prefill: rows of different widths
# after different pasts, a row with no new token, and a width-1 decode in between
STEPS = [((5, 2, 7), "causal"), ((3, 1, 0), None), ((1, 1, 1), "causal"), ((2, 4, 3), None)]


def _blocks(rng, steps):
    """Per row, the token blocks each step adds (fixed pseudo-random ids)."""
    return [[list(rng.integers(3, 150, n[b])) for n, _ in steps] for b in range(3)]


def _pad(blocks_of_step):
    lens = np.array([len(x) for x in blocks_of_step], dtype=np.int64)
    ids = np.zeros((len(lens), max(1, int(lens.max()))), np.int64)  # (B, S) right-padded
    for b, x in enumerate(blocks_of_step):
        ids[b, : len(x)] = x
    return ids, lens


def _reference(model, blocks, masks, window=0):
    """Per row, PyTorch logits (T, V) over the row's whole sequence, each token seeing the
    earlier ones and, in a step run with the block mask, every token of its own block."""
    import torch

    out = []
    for row in blocks:
        ids = [t for blk in row for t in blk]
        step_of = np.repeat(np.arange(len(row)), [len(blk) for blk in row])
        i, j = np.arange(len(ids))[:, None], np.arange(len(ids))[None, :]
        block = np.array([m == "block" for m in masks])[step_of][:, None]
        seen = (j <= i) | (block & (step_of[:, None] == step_of[None, :]))
        if window:
            seen &= j > i - window
        with torch.no_grad():
            logits = model(torch.tensor([ids]), attention_mask=torch.from_numpy(seen)[None, None])
        out.append(logits.logits[0].numpy())
    return out


def _run(session, blocks, masks, cache_len=32):
    """Run the steps through one cache; per step, the logits of every position (B, S, V)."""
    cache = session.new_cache(3, cache_len)
    got = []
    for k, mask in enumerate(masks):
        ids, lens = _pad([row[k] for row in blocks])
        got.append(session.step(cache, ids, lens, logits="all", mask=mask))
    return got, cache


def _compare(got, ref, blocks):
    for b, row in enumerate(blocks):
        start = 0
        for k, blk in enumerate(row):
            n = len(blk)
            np.testing.assert_allclose(got[k][b, :n], ref[b][start:start + n], atol=ATOL, rtol=0,
                                       err_msg=f"row {b} step {k}")
            start += n


@pytest.mark.parametrize("mask", ["causal", "block"])
# mixtral, qwen3_moe: the MoE node (arx export --moe op) passes through the step graph
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "mixtral", "qwen3_moe"])
def test_ragged_steps_after_a_past_match_pytorch(family, mask, exported_bundle, hf_model_dir):
    steps = [(n, m or mask) for n, m in STEPS]
    blocks, masks = _blocks(np.random.default_rng(1), steps), [m for _, m in steps]
    ref = _reference(hf_model_dir(family)[1], blocks, masks)
    with DecoderSession(exported_bundle(family)) as session:
        got, cache = _run(session, blocks, masks)
    _compare(got, ref, blocks)
    np.testing.assert_array_equal(cache.lengths, [sum(len(x) for x in row) for row in blocks])


def test_sliding_window_past_the_window(exported_bundle, hf_model_dir):
    """Mistral (window 24): rows reach 40 tokens in multi-token steps of both masks."""
    steps = [((9, 3, 12), "causal"), ((10, 14, 6), "causal"), ((12, 7, 11), "block"),
             ((9, 16, 4), "causal")]
    blocks, masks = _blocks(np.random.default_rng(2), steps), [m for _, m in steps]
    ref = _reference(hf_model_dir("mistral")[1], blocks, masks, window=24)
    with DecoderSession(exported_bundle("mistral")) as session:
        got, _ = _run(session, blocks, masks, cache_len=64)
    _compare(got, ref, blocks)


def test_rollback_then_redecode_equals_never_decoded(exported_bundle):
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 150, n)) for n in (6, 3, 5)]
    draft = rng.integers(3, 150, (3, 4))  # a verify block per row, partly rejected
    accepted = np.array([2, 0, 4])  # rows keep 2, none, all of their block
    follow = rng.integers(3, 150, (3, 3))
    with DecoderSession(exported_bundle("llama")) as session:
        ids, lens = _pad(prompts)
        spec = session.new_cache(3, 24)
        session.step(spec, ids, lens, logits="last")
        session.step(spec, draft, np.full(3, 4), logits="all")
        session.step(spec, draft[:, :1], np.ones(3, np.int64))  # a decode step, rolled back too
        spec.rollback(lens + accepted)
        got = session.step(spec, follow, np.full(3, 3), logits="all")

        plain = session.new_cache(3, 24)
        session.step(plain, *_pad([p + list(d[:a]) for p, d, a in zip(prompts, draft, accepted)]))
        want = session.step(plain, follow, np.full(3, 3), logits="all")
        np.testing.assert_array_equal(spec.lengths, plain.lengths)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        # and a decode step after the rollback reads the same cache as well
        nxt = np.array([[7], [8], [9]])
        one = np.ones(3, np.int64)
        np.testing.assert_allclose(session.step(spec, nxt, one), session.step(plain, nxt, one),
                                   atol=1e-5, rtol=0)


def test_rollback_never_grows_a_row(exported_bundle):
    with DecoderSession(exported_bundle("llama")) as session:
        cache = session.new_cache(2, 8)
        session.step(cache, np.array([[5, 6, 7], [8, 9, 0]]), np.array([3, 2]))
        for bad in ([4, 1], [-1, 0], [1, 1, 1], [1.0, 1.0]):
            with pytest.raises(ArxError, match="never grows"):
                cache.rollback(np.array(bad))
        np.testing.assert_array_equal(cache.lengths, [3, 2])


def test_logits_at_chosen_positions(exported_bundle):
    rng = np.random.default_rng(4)
    blocks = [rng.integers(3, 150, (3, 4)), rng.integers(3, 150, (3, 5))]
    lens = [np.array([4, 2, 3]), np.array([5, 1, 4])]
    picks = np.array([[0, 4], [0, 0], [3, 1]])
    with DecoderSession(exported_bundle("llama")) as session:
        a, b = session.new_cache(3, 16), session.new_cache(3, 16)
        assert session.step(a, blocks[0], lens[0], logits="none") is None  # still stored
        session.step(b, blocks[0], lens[0], logits="last")
        full = session.step(a, blocks[1], lens[1], logits="all")
        chosen = session.step(b, blocks[1], lens[1], logits=picks)
        np.testing.assert_array_equal(a.lengths, b.lengths)
    assert chosen.shape[:2] == (3, 2)
    np.testing.assert_allclose(chosen, np.take_along_axis(full, picks[:, :, None], axis=1),
                               atol=1e-5, rtol=0)
    with DecoderSession(exported_bundle("llama")) as session:
        with pytest.raises(ArxError, match="positions"):
            session.step(session.new_cache(3, 16), blocks[0], lens[0], logits=np.array([[4]] * 3))


def test_plain_decode_and_prefill_stay_on_the_fused_graph(exported_bundle):
    """Generation's steps never open the general-step graph (one session, one set of weights)."""
    with DecoderSession(exported_bundle("llama")) as session:
        cache = session.new_cache(3, 16)
        session.step(cache, np.array([[5, 6, 7], [8, 9, 0], [4, 0, 0]]), np.array([3, 2, 1]))
        for t in range(3):
            session.step(cache, np.full((3, 1), 10 + t), np.ones(3, np.int64), logits="last")
        assert session._general is None
        session.step(cache, np.full((3, 2), 20), np.array([2, 1, 2]))
        assert session._general is not None


def test_embeddings_where_the_stage_takes_ids_are_refused(exported_bundle):
    with DecoderSession(exported_bundle("llama")) as session:
        with pytest.raises(ArxError, match="takes input_ids, not inputs_embeds"):
            session.step(session.new_cache(1, 4), None, np.array([2]),
                         inputs_embeds=np.zeros((1, 2, 64), np.float32))


def _copy(bundle, tmp_path, edit):
    out = tmp_path / "copy.arx"
    shutil.copytree(bundle, out)
    data = json.loads((out / "arx.json").read_text())
    edit(data)
    (out / "arx.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("step_graph"), "no general-step graph"),
    (lambda d: d["step_graph"].update(sha256="0" * 64), "other weights"),  # e.g. calibrated
])
def test_bundles_without_a_usable_step_graph_say_so(exported_bundle, tmp_path, edit, message):
    bundle = _copy(exported_bundle("llama"), tmp_path, edit)
    with DecoderSession(bundle) as session:
        cache = session.new_cache(2, 8)
        session.step(cache, np.array([[5, 6, 7], [8, 9, 0]]), np.array([3, 2]))  # fused: fine
        with pytest.raises(ArxError, match=message):
            session.step(cache, np.array([[1, 2], [3, 0]]), np.array([2, 1]))


def test_step_graph_shares_the_decoder_weights(exported_bundle):
    bundle = exported_bundle("llama")
    step, data = bundle / "decoder_step.onnx", bundle / "decoder.onnx.data"
    assert step.stat().st_size < data.stat().st_size / 10  # no copy of the weights
    assert sorted(p.name for p in bundle.glob("*.data")) == ["decoder.onnx.data"]


def test_attention_reads_only_the_longest_rows_keys(exported_bundle):
    """Each Attention of the step graph reads a Slice of its cache buffer up to the longest
    row's total (ORT CPU's Attention costs the whole buffer otherwise), and a long buffer gives
    the logits of a short one."""
    import onnx

    bundle = exported_bundle("llama")
    graph = onnx.load(str(bundle / "decoder_step.onnx"), load_external_data=False).graph
    made = {o: n for n in graph.node for o in n.output}
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert attention
    for node in attention:
        for cache in node.input[1:3]:
            cut = made[cache]
            assert cut.op_type == "Slice" and made[cut.input[0]].op_type == "TensorScatter"
            assert made[cut.input[2]].name.endswith("seq/T")
    blocks = _blocks(np.random.default_rng(3), STEPS)
    masks = [m or "block" for _, m in STEPS]
    with DecoderSession(bundle) as session:
        short, _ = _run(session, blocks, masks, cache_len=32)
        long, _ = _run(session, blocks, masks, cache_len=256)
    for k, (a, b) in enumerate(zip(short, long)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"step {k}")


def test_a_step_past_the_cache_end_is_refused_before_running(exported_bundle):
    """The general graph writes the whole block per row: a row near the end of the cache and a
    wide step would write past it (ORT fails mid-graph); refused up front, cache untouched."""
    with DecoderSession(exported_bundle("llama")) as session:
        cache = session.new_cache(2, 16)
        session.step(cache, np.array([[5] * 14, [6] * 14]), np.array([14, 2]))
        with pytest.raises(ArxError, match="row 0 already holds 14 of the cache's 16"):
            session.step(cache, np.array([[1, 0, 0, 0], [2, 3, 4, 5]]), np.array([1, 4]))
        np.testing.assert_array_equal(cache.lengths, [14, 2])


def test_concat_cache_rolls_back_to_one_length_only():
    """A cache grown by concatenation (custom-protocol graphs that keep it): rows share one
    length, so a rollback to one length keeps exactly those entries; a ragged one is refused."""
    from arx.manifest import KVLayout
    from arx.runtime.kv_cache import KVCache

    layout = KVLayout(layers=1, kv_heads=2, head_dim=4, max_seq_len=16, update="concat")
    cache = KVCache(None, layout, batch=2)
    presents = {q: np.random.default_rng(5).random((2, 2, 5, 4), np.float32)
                for _, q in layout.pairs()}  # (B, kv_heads, 5, D): what a 5-token step returns
    cache.advance(np.array([5, 5]), dict(presents))
    with pytest.raises(ArxError, match="one length"):
        cache.rollback(np.array([4, 3]))
    cache.rollback(np.array([3, 3]))
    for past, present in layout.pairs():
        np.testing.assert_array_equal(cache.feeds()[past], presents[present][:, :, :3])
    np.testing.assert_array_equal(cache.lengths, [3, 3])


def test_export_parity_covers_a_general_step(family, exported_bundle):
    """Every family's export checks one ragged multi-token step after the past (general graph)
    against PyTorch, next to prefill and decode."""
    from arx.manifest import read_manifest

    parity = read_manifest(exported_bundle(family)).parity
    assert parity["passed"] is True
    assert parity["outputs"]["logits/step"]["max_abs"] < 1e-4
