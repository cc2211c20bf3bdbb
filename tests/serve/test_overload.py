"""Overload and disconnects: a full queue answers 429 with Retry-After while the running
requests go on; a client that goes away (streamed or not) cancels its request, whose slot the
next request gets. The session is slowed to 20 ms a step so that the timing is not a race."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

import pytest

from arx.runtime.decoder import DecoderSession
from arx.serve.server import background, make_server

openai = pytest.importorskip("openai")
STEP_S = 0.02


class Slow:
    def __init__(self, session):
        self.inner = session

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, *a, **k):
        time.sleep(STEP_S)
        return self.inner.step(*a, **k)


@pytest.fixture
def one_slot(exported_bundle):
    bundle = exported_bundle("llama")
    with DecoderSession(bundle) as session:
        server = make_server(Slow(session), bundle, max_batch=1, max_queue=1, model="m")
        with background(server) as url:
            yield url, server


def _open(url, body: dict) -> http.client.HTTPConnection:
    """Send a completion request on a raw connection (closing it is a client disconnect)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "m", **body}),
                 {"Content-Type": "application/json"})
    return conn


def _wait_for(server, timeout=10, **want):
    deadline = time.monotonic() + timeout
    while {k: server.scheduler.stats()[k] for k in want} != want:
        assert time.monotonic() < deadline, server.scheduler.stats()
        time.sleep(0.01)


LONG = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True}


def test_full_queue_is_429_and_a_streaming_disconnect_frees_the_slot(one_slot):
    url, server = one_slot
    stream = _open(url, {**LONG, "stream": True})
    resp = stream.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # it is running
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(r=openai.OpenAI(
        base_url=url + "/v1", api_key="-", max_retries=0).completions.create(
            model="m", prompt=[8, 9], max_tokens=3, temperature=0)))
    waiter.start()
    _wait_for(server, running=1, waiting=1)
    with pytest.raises(openai.RateLimitError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0).completions.create(
            model="m", prompt=[1, 2], max_tokens=3)
    assert int(e.value.response.headers["Retry-After"]) >= 1
    assert "queue is full" in e.value.body["message"]
    stream.close()  # the client goes away mid-stream
    waiter.join(timeout=20)
    assert len(queued["r"].choices[0].model_extra["token_ids"]) == 3  # got the freed slot
    assert server.metrics.requests["cancelled"] == 1
    assert server.metrics.rejected[429] == 1
    _wait_for(server, running=0, waiting=0)


def test_a_non_streamed_disconnect_cancels(one_slot):
    url, server = one_slot
    conn = _open(url, LONG)
    _wait_for(server, running=1)
    conn.close()
    _wait_for(server, running=0)  # long before its 200 tokens (4 s) would have run
    assert server.metrics.requests["cancelled"] == 1
