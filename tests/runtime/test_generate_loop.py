"""The one generation loop over a session, with a scripted fake session (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from arx.manifest import KVLayout, Manifest, Stage, TensorSpec, TokenizerInfo
from arx.runtime.generate import Capacity, GenerateOptions, generate

V, EOS = 8, 2


class FakeCache:
    def __init__(self, batch):
        self.lengths = np.zeros(batch, np.int64)
        self.closed = False

    def rollback(self, lengths):
        self.lengths = np.asarray(lengths, np.int64).copy()

    def close(self):
        self.closed = True


class ScriptedSession:
    """Row 0 emits EOS as its second token; row 1 always token 5. Each step "takes" 1 s."""

    ragged = True

    def __init__(self, fail_at: int | None = None):
        stage = Stage("decoder.onnx", (TensorSpec("input_ids", "int64", ("b", "s")),),
                      (TensorSpec("logits", "float32", ("b", "k", V)),),
                      kv=KVLayout(1, 1, 16, 64), token_space="text")
        self.manifest = Manifest(family="fake", vocab_size=V, stages={"decoder": stage},
                                 tokenizer=TokenizerInfo(None, eos_token_ids=(EOS,)))
        self.capacity = Capacity(64, "the fake context", "no remedy")
        self.caches, self.steps, self.fail_at = [], 0, fail_at

    def new_cache(self, batch, max_len):
        self.caches.append(FakeCache(batch))
        return self.caches[-1]

    def step(self, cache, ids, new_lens, logits="last"):
        self.steps += 1
        if self.steps == self.fail_at:
            raise KeyboardInterrupt
        cache.lengths = cache.lengths + new_lens
        out = np.zeros((len(new_lens), 1, V), np.float32)
        out[0, 0, EOS if cache.lengths[0] > 3 else 4] = 1  # prompt of 3: EOS as 2nd token
        out[1, 0, 5] = 1
        return out


def test_decode_tokens_per_s_counts_only_unfinished_rows(monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("arx.runtime.generate.time.perf_counter", lambda: next(clock))
    session = ScriptedSession()
    result = generate(session, [[1, 3, 4], [1, 3, 4]], GenerateOptions(max_new_tokens=5))
    assert result.tokens == [[4, EOS], [5] * 5] and result.finish_reasons == ["eos", "length"]
    # 4 decode steps of 1 s each produced 1 + 1 + 1 + 1 tokens for row 1 and 1 for row 0 (EOS)
    assert result.step_rows == [2, 1, 1, 1]
    assert result.decode_tokens_per_s == pytest.approx(5 / 4)  # was 2 rows x 4 steps / 4 s = 2.0


def test_the_cache_is_released_when_a_generation_stops_early():
    session = ScriptedSession(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        generate(session, [[1, 3, 4], [1, 3, 4]], GenerateOptions(max_new_tokens=5))
    assert session.caches[0].closed
