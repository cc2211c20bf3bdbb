"""benchmarks/serve_policy_model.py: the real scheduler on a virtual clock. With one client the
clock is exact (every gap one 1-row decode step, the first token after the idle chunks of the
prompt), and a narrower chunk beside decoding rows gives shorter gaps and fewer tokens/s."""

from __future__ import annotations

import pytest

from bench_scripts import load_script


@pytest.fixture(scope="module")
def model():
    return load_script("serve_policy_model")


def _run(model, tmp_path, clients, chunk):
    from arx.runtime.decoder import DecoderSession

    args = model.parse_args(["--requests", "2", "--prompt-len", "40", "--new-tokens", "12",
                             "--max-batch", "4", "--cache-dir", str(tmp_path)])
    with DecoderSession(model.soak_serve.tiny_bundle(tmp_path)) as session:
        return model.replay(session, args, clients, chunk)


def test_one_client_is_charged_exactly(model, tmp_path):
    r = _run(model, tmp_path, 1, 8)
    assert r["itl_p50_ms"] == pytest.approx(16.1) and r["itl_p99_ms"] == pytest.approx(16.1)
    # 40 prompt tokens with nothing decoding: one idle chunk of 40 (interpolated, 8..64)
    assert r["ttft_p50_ms"] == pytest.approx(42.5 + (67.5 - 42.5) * 8 / 32)


def test_chunk_trades_gaps_for_tokens_per_s(model, tmp_path):
    narrow, wide = (_run(model, tmp_path, 4, c) for c in (4, 40))
    assert narrow["itl_p99_ms"] < wide["itl_p99_ms"]
    assert narrow["tokens_per_s"] < wide["tokens_per_s"]
