"""`arx serve --ray`: two replicas of the server behind Ray Serve's HTTP proxy, on a local Ray
cluster the test starts (in under 60 s), driven by the `openai` client: greedy completions of 4
concurrent clients, streamed and not, equal `arx generate`. And the option's refusals."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arx.cli import main
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate
from arx.runtime.sampler import SamplingOptions

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

PROMPTS = ["def fib(n):", "The quick brown", "Hello, world", "class Point:"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic fields
def test_two_replicas_behind_ray_serve(chat_bundle):
    from ray import serve

    from arx.serve import ray_app

    tok, bundle = chat_bundle
    with DecoderSession(bundle) as session:  # what arx generate gives, greedy
        want = generate(session, [tok(p)["input_ids"] for p in PROMPTS],
                        GenerateOptions(max_new_tokens=12, sampling=SamplingOptions())).tokens
    port, t0 = _free_port(), time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_app.run(bundle, host="127.0.0.1", port=port, replicas=2, cpus=0.5, blocking=False,
                    options={"max_batch": 2, "model": "tiny"}, backend={"intra_op_threads": 1})
        assert time.monotonic() - t0 < 60
        replicas = serve.status().applications[ray_app.APP].deployments["arx_replica"]
        assert replicas.replica_states == {"RUNNING": 2}
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0,
                          timeout=120)

        def ask(k):
            args = dict(model="tiny", prompt=PROMPTS[k], max_tokens=12, temperature=0)
            if k % 2:
                return [t for ch in c.completions.create(**args, stream=True)
                        for choice in ch.choices for t in choice.model_extra["token_ids"]]
            return c.completions.create(**args).choices[0].model_extra["token_ids"]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, range(len(PROMPTS))))
        assert got == [list(w) for w in want]
        assert [m.id for m in c.models.list()] == ["tiny"]
    finally:
        ray_app.shutdown()


@pytest.mark.parametrize("argv,fragment", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--ray", "--replicas", "0"], "--replicas must be >= 1"),
])
def test_refusals_are_one_line(exported_bundle, capsys, argv, fragment):
    assert main(["serve", str(exported_bundle("llama")), "--port", "0", *argv]) == 2
    assert fragment in capsys.readouterr().err
