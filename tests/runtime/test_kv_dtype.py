"""fp16 and int8 KV caches (arx export --kv-dtype): tokens, rollback, ragged rows, general steps.

Each bundle here is the session's fp32 export of a tiny family, copied and converted by the
same function `arx export --kv-dtype` calls (its int8 scales from seeded random ids).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from arx.export.kv_dtype import convert_export
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession

# RoPE + GQA heads, qk norms, learned positions and no RoPE, a sliding window, soft-caps
KV_FAMILIES = ("llama", "qwen3", "gpt2", "mistral", "gemma2")
PROMPTS = np.array([[5, 9, 14, 22, 7, 3], [3, 11, 8, 0, 0, 0], [40, 2, 17, 29, 0, 0]])
LENS = np.array([6, 3, 4])
# fp16 keys/values round at 2^-11 relative: on these models (logits of magnitude ~10) the
# measured step logits move by at most ~0.03
FP16_LOGIT_ATOL = 0.1
# the fused graph's fp16 attention runs in fp16 (q cast, as GQA takes T=float16), the general
# graph's in fp32 over the same cache: measured up to 0.015 apart (int8: both dequantize the
# same codes in fp32, up to 0.0008)
CROSS_GRAPH_ATOL = {"fp16": 0.05, "int8": 2e-3}


@pytest.fixture(scope="module")
def kv_bundle(exported_bundle, tmp_path_factory):
    made = {}

    def get(family: str, flag: str):
        if (family, flag) not in made:
            out = tmp_path_factory.mktemp(f"kv-{family}-{flag}") / f"{family}.arx"
            shutil.copytree(exported_bundle(family), out)
            convert_export(out, read_manifest(out), flag).write(out)
            made[family, flag] = out
        return made[family, flag]

    return get


def _greedy(bundle, steps: int = 24, forced: np.ndarray | None = None):
    """Ragged batch-3 prefill, then greedy decode (or decode of `forced` (3, steps) tokens):
    (tokens (3, steps), logits (3, steps, V))."""
    with DecoderSession(bundle) as s:
        cache = s.new_cache(3, 64)
        logits = s.step(cache, PROMPTS, LENS, logits="last")
        tokens, seen = [], []
        for t in range(steps):
            tokens.append(logits[:, -1].argmax(-1) if forced is None else forced[:, t])
            seen.append(logits[:, -1])
            logits = s.step(cache, tokens[-1][:, None], np.ones(3, np.int64), logits="last")
    return np.stack(tokens, 1), np.stack(seen, 1)


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_fp16_cache_greedy_equals_fp32(family, exported_bundle, kv_bundle):
    """On the fp32 run's tokens, every fp16 step's logits lie within FP16_LOGIT_ATOL, so its
    greedy token is the same wherever fp32's top two are further apart than twice that."""
    want, want_logits = _greedy(exported_bundle(family))
    _, got_logits = _greedy(kv_bundle(family, "fp16"), forced=want)
    np.testing.assert_allclose(got_logits, want_logits, atol=FP16_LOGIT_ATOL, rtol=0)
    top2 = np.sort(want_logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * FP16_LOGIT_ATOL
    assert clear.mean() > 0.5  # the check bites on most steps (these logits are close)
    np.testing.assert_array_equal(got_logits.argmax(-1)[clear], want[clear])


@pytest.mark.parametrize("flag", ["fp16", "int8"])
def test_manifest_and_buffers_carry_the_dtype(flag, exported_bundle, kv_bundle):
    m = read_manifest(kv_bundle("llama", flag))
    dtype = {"fp16": "float16", "int8": "int8"}[flag]
    assert m.kv.dtype == dtype and m.kv.scales == ("per_channel" if flag == "int8" else "none")
    assert {t.dtype for t in m.decoder.inputs if t.name.startswith("past_")} == {dtype}
    assert m.extensions["kv_cache"]["dtype"] == dtype
    with DecoderSession(kv_bundle("llama", flag)) as s:
        cache = s.new_cache(2, 32)
        assert {b.numpy().dtype.name for b in cache.buffers.values()} == {dtype}
        s.step(cache, PROMPTS[:2], LENS[:2], logits="none")
        first = cache.buffers["past_key_values.0.key"].numpy()
        assert first[0, :, :6].any() and not first[0, :, 6:].any()  # written where the row is


@pytest.mark.parametrize("flag", ["fp16", "int8"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ragged_rows_equal_each_row_alone(family, flag, kv_bundle):
    """A row of the batch decodes exactly as it does at batch 1 (same dtype: same rounding)."""
    bundle = kv_bundle(family, flag)
    tokens, logits = _greedy(bundle, steps=6)
    with DecoderSession(bundle) as s:
        for b in range(3):
            cache = s.new_cache(1, 64)
            out = s.step(cache, PROMPTS[b:b + 1, :LENS[b]], LENS[b:b + 1], logits="last")
            for t in range(6):
                np.testing.assert_allclose(out[0, -1], logits[b, t], atol=1e-4, rtol=0)
                out = s.step(cache, tokens[b:b + 1, t:t + 1], np.ones(1, np.int64), logits="last")


@pytest.mark.parametrize("flag", ["fp16", "int8"])
def test_rollback_then_decode_equals_a_fresh_run(flag, kv_bundle):
    """Rows cut back (rejected draft tokens) and decoded anew match a run that never had them:
    the stale fp16/int8 entries past each length are never read."""
    bundle = kv_bundle("llama", flag)
    nxt = np.array([[12], [33], [7]])
    with DecoderSession(bundle) as s:
        cache = s.new_cache(3, 64)
        s.step(cache, PROMPTS, LENS, logits="none")
        for junk in (50, 60, 70):
            s.step(cache, np.full((3, 1), junk), np.ones(3, np.int64), logits="none")
        cache.rollback(np.array([6, 4, 4]))  # row 0 back to its prompt, rows 1/2 keep one
        got = s.step(cache, nxt, np.ones(3, np.int64), logits="last")
        fresh = s.new_cache(3, 64)
        s.step(fresh, PROMPTS, LENS, logits="none")
        s.step(fresh, np.array([[1], [50], [1]]), np.array([0, 1, 0]), logits="none")
        want = s.step(fresh, nxt, np.ones(3, np.int64), logits="last")
    np.testing.assert_allclose(got, want, atol=CROSS_GRAPH_ATOL[flag], rtol=0)


@pytest.mark.parametrize("flag", ["fp16", "int8"])
def test_rows_view_decodes_into_the_batch_cache(flag, kv_bundle):
    """KVCache.rows (serving's occupied rows) over an fp16/int8 buffer writes the parent's."""
    bundle = kv_bundle("llama", flag)
    with DecoderSession(bundle) as s:
        batch = s.new_cache(3, 64)
        s.step(batch, PROMPTS, LENS, logits="none")
        want = s.step(batch.row(1), np.array([[21]]), np.ones(1, np.int64), logits="last")
        assert batch.lengths.tolist() == [6, 4, 4]
        alone = s.new_cache(1, 64)
        s.step(alone, PROMPTS[1:2, :3], LENS[1:2], logits="none")
        np.testing.assert_allclose(s.step(alone, np.array([[21]]), np.ones(1, np.int64),
                                          logits="last"), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("flag", ["fp16", "int8"])
def test_general_step_graph_reads_the_same_cache(flag, kv_bundle):
    """A 3-token step after a past at batch 3 (the general-step graph: TensorScatter writes the
    encoded block, Attention reads the decoded cache) equals three fused decode steps."""
    bundle = kv_bundle("llama", flag)
    block = np.array([[8, 9, 10], [11, 12, 13], [14, 15, 16]])
    with DecoderSession(bundle) as s:
        general = s.new_cache(3, 64)
        s.step(general, PROMPTS, LENS, logits="none")
        got = s.step(general, block, np.full(3, 3), logits="all")
        assert s._general is not None
        fused = s.new_cache(3, 64)
        s.step(fused, PROMPTS, LENS, logits="none")
        want = [s.step(fused, block[:, t:t + 1], np.ones(3, np.int64), logits="last")[:, 0]
                for t in range(3)]
    np.testing.assert_allclose(got, np.stack(want, 1), atol=CROSS_GRAPH_ATOL[flag], rtol=0)


def test_int8_prefill_reads_the_quantized_cache(kv_bundle):
    """GQA's int8 prefill attends over the keys/values it quantized, as decode does: prefill
    logits (what arx calibrate's accuracy report measures) equal token-by-token decode."""
    bundle = kv_bundle("llama", "int8")
    ids = PROMPTS[:1]
    with DecoderSession(bundle) as s:
        whole = s.step(s.new_cache(1, 64), ids, np.array([6]), logits="all")[0]
        cache = s.new_cache(1, 64)
        steps = [s.step(cache, ids[:, t:t + 1], np.ones(1, np.int64), logits="last")[0, 0]
                 for t in range(6)]
    np.testing.assert_allclose(whole, np.stack(steps), atol=2e-3, rtol=0)


def test_old_manifest_without_scales_loads(exported_bundle):
    import json

    from arx.manifest import KVLayout

    kv = json.loads((exported_bundle("llama") / "arx.json").read_text())["stages"]["decoder"]["kv"]
    kv.pop("scales", None)
    assert KVLayout(**kv).scales == "none" and KVLayout(**kv).dtype == "float32"
