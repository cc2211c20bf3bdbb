"""benchmarks/soak_serve.py, a quarter of its default length: 500 requests (about 10 s on the
shared 2-core machine; the 2,000 of `python benchmarks/soak_serve.py` take ~40 s) to `arx serve`
on models/arx-tiny in its own process, random parameters, provoked 400s and clients that go
away; no other error, bounded RSS growth, no leaked slot. And the answer checker itself, on
answers that must fail it."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load_script


@pytest.fixture(scope="module")
def soak():
    return load_script("soak_serve")


@pytest.mark.slow
def test_500_requests_with_disconnects(soak, tmp_path, capsys):
    out = tmp_path / "soak.json"
    rc = soak.main(["--requests", "500", "--warmup", "50", "--cache-dir", str(tmp_path),
                    "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    counts = report["counts"]
    assert sum(counts.values()) == 500 and min(counts.values()) > 0  # each kind happened
    assert report["finished"]["cancelled"] > 0  # disconnects reached the scheduler
    assert report["leaked_slots"] == 0 and report["health_end"]["running"] == 0
    assert report["rss_growth_mib"] < report["rss_bound_mib"]
    assert "leaked slots 0" in capsys.readouterr().out


def _stream(*chunks: dict, done=True) -> bytes:
    lines = [b"data: " + json.dumps(c).encode() for c in chunks] + ([b"data: [DONE]"] if done else [])
    return b"\n\n".join(lines)


def test_the_checker_catches_incomplete_answers(soak):
    body = {"prompt": "a cat", "max_tokens": 2, "n": 1, "stream": True}
    tok = lambda ids, reason=None: {"choices": [  # noqa: E731
        {"index": 0, "token_ids": ids, "finish_reason": reason}]}
    assert soak.check_answer(body, 200, _stream(tok([5]), tok([6], "length"))) is None
    assert "[DONE]" in soak.check_answer(body, 200, _stream(tok([5]), done=False))
    assert "finish reasons []" in soak.check_answer(body, 200, _stream(tok([5])))
    assert "3 tokens of 2" in soak.check_answer(body, 200, _stream(tok([5, 6, 7], "length")))
    assert "HTTP 500" in soak.check_answer(body, 500, b'{"error": {}}')
    scored = {**body, "logprobs": 1}  # a token without its logprobs
    assert "logprobs for 0 of 2" in soak.check_answer(scored, 200, _stream(tok([5]), tok([6], "length")))
    whole = {**body, "stream": False, "n": 2}
    one = json.dumps({"choices": [{"index": 0, "token_ids": [5], "finish_reason": "stop"}]})
    assert "choice 1" in soak.check_answer(whole, 200, one.encode())
