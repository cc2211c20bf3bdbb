"""The server as users call it: started on a free port of 127.0.0.1 in a thread, driven with the
`openai` client (8 concurrent clients, streamed and not) and with raw HTTP for what a client
library would not send; every greedy completion token-identical to `arx generate`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from arx.cli import main
from arx.runtime.decoder import DecoderSession
from arx.serve.server import background, make_server

openai = pytest.importorskip("openai")

PROMPTS = ["def fib(n):", "The quick brown", "Hello, world", "class Point:", "Café au",
           "    indented", "It's 2024", "São Paulo is"]
NEW = 20


@pytest.fixture(scope="module")
def served(chat_bundle):
    tok, bundle = chat_bundle
    with DecoderSession(bundle) as session:
        server = make_server(session, bundle, max_batch=4, chunk=6)
        with background(server) as url:
            yield url, tok, bundle


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def arx_generate(capsys, bundle, *args):
    capsys.readouterr()
    assert main(["generate", str(bundle), "--greedy", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["sequences"]


def streamed_text(bundle, ids):
    """What `arx generate` prints streaming these ids (the runtime's StreamDecoder)."""
    from arx.manifest import read_manifest
    from arx.runtime.tokenizer import Tokenizer

    decoder = Tokenizer.from_bundle(bundle, read_manifest(bundle).tokenizer).stream()
    return decoder.extend(ids) + decoder.flush()


def _stream_completion(c, prompt):
    text, ids, reasons = "", [], []
    for chunk in c.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0,
                                      stream=True):
        for ch in chunk.choices:
            text += ch.text
            ids += ch.model_extra["token_ids"]
            reasons.append(ch.finish_reason)
    return text, ids, [r for r in reasons if r]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_greedy_completions_equal_arx_generate_with_8_clients(served, capsys, stream):
    url, tok, bundle = served
    want = arx_generate(capsys, bundle, "--max-new-tokens", str(NEW),
                        *[a for p in PROMPTS for a in ("--prompt", p)])
    c = client(url)

    def ask(prompt):
        if stream:
            return _stream_completion(c, prompt)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0)
        ch = r.choices[0]
        assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        return ch.text, ch.model_extra["token_ids"], [ch.finish_reason]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, PROMPTS))
    for (text, ids, reasons), seq in zip(got, want):
        assert ids == seq["tokens"]
        assert text == (streamed_text(bundle, ids) if stream else seq["text"])
        assert reasons == [{"eos": "stop", "length": "length"}[seq["finish_reason"]]]


def test_chat_uses_the_bundles_template(served, capsys):
    url, tok, bundle = served
    assert (bundle / "chat_template.jinja").read_text() == tok.chat_template  # arx export wrote it
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    want = arx_generate(capsys, bundle, "--max-new-tokens", "12",
                        "--prompt-ids", ",".join(map(str, ids)))[0]
    c = client(url)
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].model_extra["token_ids"] == want["tokens"]
    assert r.choices[0].message.content == want["text"]
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = [t for ch in chunks for choice in ch.choices for t in choice.model_extra["token_ids"]]
    assert streamed == want["tokens"]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        streamed_text(bundle, streamed)
    assert chunks[-1].usage.completion_tokens == len(want["tokens"])


def test_n_choices_with_a_seed_are_distinct_and_reproducible(served):
    c = client(served[0])
    ask = lambda: c.completions.create(model="tiny", prompt=["Hello", "def"], n=3, seed=11,  # noqa: E731
                                       temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True})
    first, again = ask(), ask()
    ids = [ch.model_extra["token_ids"] for ch in first.choices]
    assert [ch.index for ch in first.choices] == list(range(6))
    assert ids == [ch.model_extra["token_ids"] for ch in again.choices]
    assert len({tuple(x) for x in ids[:3]}) > 1  # seed, seed + 1, seed + 2
    assert first.usage.completion_tokens == 48


def test_stop_strings_cut_the_text(served):
    c = client(served[0])
    full = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=20,
                                temperature=0).choices[0].text
    stop = full[5:8]
    r = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=20,
                             temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.find(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=20, temperature=0, stop=stop,
        stream=True))
    assert streamed == full[: full.find(stop)]


def _model_logprobs(bundle, ids):
    """log_softmax of the model's next-token logits after `ids`, from a session of its own."""
    with DecoderSession(bundle) as s:
        z = s.step(s.new_cache(1), np.array([ids]), np.array([len(ids)]), logits="last")
    z = z[0, 0].astype(np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def test_completion_logprobs_are_the_models(served):
    url, tok, bundle = served
    c = client(url)
    ask = dict(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0, logprobs=3,
               extra_body={"ignore_eos": True})
    choice = c.completions.create(**ask).choices[0]
    lp, ids = choice.logprobs, choice.model_extra["token_ids"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) == 6
    want = _model_logprobs(bundle, tok("The quick brown")["input_ids"])
    assert lp.token_logprobs[0] == pytest.approx(want[ids[0]], abs=1e-4)
    top0 = sorted(want, reverse=True)[:3]
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(top0, abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen)  # greedy: the argmax
    assert lp.tokens == [tok.decode([i]) for i in ids]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(6)]
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(**ask, stream=True)
                if ch.choices and ch.choices[0].logprobs]
    assert [x for part in streamed for x in part.token_logprobs] == pytest.approx(lp.token_logprobs)
    assert [x for part in streamed for x in part.text_offset] == lp.text_offset
    assert c.completions.create(**{**ask, "logprobs": None}).choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(served):
    c = client(served[0])
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
               temperature=0)
    choice = c.chat.completions.create(**ask, logprobs=True, top_logprobs=2).choices[0]
    content = choice.logprobs.content
    assert len(content) == len(choice.model_extra["token_ids"]) > 0
    for item in content:
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
        tops = [a.logprob for a in item.top_logprobs]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(item.logprob)
    chunks = [ch.choices[0].logprobs for ch in c.chat.completions.create(
        **ask, logprobs=True, stream=True) if ch.choices and ch.choices[0].logprobs]
    assert [i.logprob for part in chunks for i in part.content] == \
        pytest.approx([i.logprob for i in content])
    assert all(not i.top_logprobs for part in chunks for i in part.content)  # top_logprobs 0
    assert c.chat.completions.create(**ask).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        c.chat.completions.create(**ask, top_logprobs=2)


@pytest.mark.parametrize("kwargs,status,fragment", [
    ({"extra_body": {"logit_bias_typo": 1}}, 400, "logit_bias_typo: unknown field"),
    ({"temperature": -1}, 400, "temperature"),
    ({"max_tokens": 500}, 400, "exceeds the bundle's context of 128 tokens"),
    ({"presence_penalty": 0.5}, 400, "use repetition_penalty"),
    ({"n": 99}, 400, "n:"),
    ({"model": "gpt-4"}, 404, "this server serves 'tiny'"),
    ({"prompt": []}, 400, "the prompt is empty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"logprobs": 6}, 400, "logprobs"),
])
def test_bad_requests_get_openai_errors(served, kwargs, status, fragment):
    args = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client(served[0]).completions.create(**args)
    assert e.value.status_code == status
    assert fragment in e.value.body["message"], e.value.body


def _post(url, path, data: bytes):
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("data,fragment", [
    (b'{"model": "tiny", "prompt": "x", ', "not valid JSON"),
    (b'[1, 2]', "body"),
    (b'{"model": "tiny", "messages": []}', "messages"),
    (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
])
def test_malformed_bodies_are_400_and_the_server_goes_on(served, data, fragment):
    path = "/v1/chat/completions" if b"messages" in data else "/v1/completions"
    status, body = _post(served[0], path, data)
    assert status == 400 and fragment in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"
    assert client(served[0]).completions.create(model="tiny", prompt="Hi", max_tokens=2)


def test_models_health_and_metrics(served):
    url = served[0]
    assert [m.id for m in client(url).models.list()] == ["tiny"]
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(url + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(samples['arx_serve_requests_total{finish_reason="length"}']) >= 8
    assert float(samples["arx_serve_generation_tokens_total"]) > 100
    assert float(samples['arx_serve_rejected_total{status="400"}']) >= 1
    assert samples["arx_serve_free_slots"] == "4" and samples["arx_serve_waiting"] == "0"
    n = float(samples["arx_serve_time_to_first_token_seconds_count"])
    assert float(samples['arx_serve_time_to_first_token_seconds_bucket{le="+Inf"}']) == n > 0
    assert float(samples["arx_serve_inter_token_latency_seconds_count"]) > 0


def test_a_bundle_without_tokenizer_takes_ids_and_refuses_chat(exported_bundle):
    bundle = exported_bundle("llama")
    with DecoderSession(bundle) as session:
        with background(make_server(session, bundle, max_batch=2, model="m")) as url:
            c = client(url)
            r = c.completions.create(model="m", prompt=[5, 6, 7], max_tokens=3, temperature=0)
            assert len(r.choices[0].model_extra["token_ids"]) >= 1 and r.choices[0].text == ""
            for call in (lambda: c.completions.create(model="m", prompt="text", max_tokens=3),
                         lambda: c.chat.completions.create(
                             model="m", messages=[{"role": "user", "content": "hi"}])):
                with pytest.raises(openai.BadRequestError, match="no tokenizer"):
                    call()
