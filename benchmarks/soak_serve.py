"""Soak test of `arx serve`: many requests with random parameters and random client disconnects.

    python benchmarks/soak_serve.py                       # 2,000 requests, models/arx-tiny
    python benchmarks/soak_serve.py --requests 300 --json soak.json

Issue 11's soak: `arx serve` on the trained default model (models/arx-tiny, exported once into
--cache-dir) in its own process on 127.0.0.1; --clients threads send --requests requests in
all, each with random parameters (text or token-id prompts, max_tokens, greedy or sampled with
top-k/top-p/seed/repetition penalty, stop strings, n, streamed or not). Some requests are
provoked errors (an invalid temperature, an unknown field, a prompt over the context, chat on a
bundle without a chat template: each must be its 400) and some clients go away mid-request
(a streamed one after a few chunks, a whole one after a few milliseconds). It checks: no other
error response, every answer complete (a finish reason per choice, at most max_tokens tokens),
the server's resident memory after the first --warmup requests grows by less than --rss-bound
MiB, and no leaked slot at the end (/health: nothing running or waiting, every slot free).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402
import bench_serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "arx-tiny"
MODEL = "bench"  # the name bench_serve.start_server serves the bundle under
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "away", "over",
         "hills", "once", "upon", "time", "there", "was", "small", "dog", ".", ",")
# provoked errors: (body change, what the 400's message must say)
BAD = ({"temperature": -1}, "temperature"), ({"logit_bias": {"1": 5}}, "logit_bias"), \
      ({"prompt": [5] * 4096}, "exceeds"), ({"chat": True}, "chat template")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="the server's intra-op threads")
    p.add_argument("--disconnect", type=float, default=0.1, help="share of clients going away")
    p.add_argument("--bad", type=float, default=0.05, help="share of provoked 400s")
    p.add_argument("--warmup", type=int, default=100, help="requests before the RSS baseline")
    p.add_argument("--rss-bound", type=float, default=64.0, help="MiB of RSS growth allowed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "arx-bench"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    if min(args.requests, args.clients, args.max_batch) < 1 or args.warmup >= args.requests:
        p.error("--requests, --clients and --max-batch must be >= 1, --warmup below --requests")
    return args


def random_body(rng: random.Random) -> dict:
    """A valid completion request with random parameters."""
    if rng.random() < 0.5:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    else:
        prompt = [rng.randrange(3, 200) for _ in range(rng.randint(1, 60))]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(1, 24),
            "stream": rng.random() < 0.5, "n": rng.choice((1, 1, 1, 2))}
    if rng.random() < 0.5:
        body.update(temperature=rng.uniform(0.3, 1.5), top_p=rng.uniform(0.5, 1.0),
                    top_k=rng.choice((0, 5, 50)), seed=rng.randrange(1 << 20))
    else:
        body["temperature"] = 0
    if rng.random() < 0.2:
        body["stop"] = rng.sample(WORDS, rng.randint(1, 3))
    if rng.random() < 0.2:
        body["repetition_penalty"] = rng.uniform(1.0, 1.5)
    body["ignore_eos"] = rng.random() < 0.3
    if rng.random() < 0.2:
        body["logprobs"] = rng.randint(0, 5)
    return body


def _post(port: int, body: dict, timeout: float = 120) -> http.client.HTTPConnection:
    path = "/v1/chat/completions" if body.pop("chat", False) else "/v1/completions"
    if path.endswith("chat/completions"):
        body = {"model": body["model"], "messages": [{"role": "user", "content": "hi"}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn


def check_answer(body: dict, status: int, raw: bytes) -> str | None:
    """What is wrong with a 200 answer to a valid request (None: nothing)."""
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}"
    if body["stream"]:
        lines = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
        if not lines or lines[-1] != b"[DONE]":
            return "the stream did not end with [DONE]"
        choices = [c for ln in lines[:-1] for c in json.loads(ln)["choices"]]
    else:
        choices = json.loads(raw)["choices"]
    for i in range(body["n"]):  # one prompt (a text or one list of ids): n choices
        mine = [c for c in choices if c["index"] == i]
        tokens = sum(len(c["token_ids"]) for c in mine)
        reasons = [c["finish_reason"] for c in mine if c["finish_reason"]]
        # "length" is max_tokens exactly: these prompts leave the context room for it
        if reasons not in (["stop"], ["length"]) or tokens > body["max_tokens"] or \
                reasons == ["length"] and tokens != body["max_tokens"]:
            return f"choice {i}: finish reasons {reasons}, {tokens} tokens of {body['max_tokens']}"
        scored = sum(len(c["logprobs"]["token_logprobs"]) for c in mine if c.get("logprobs"))
        if scored != (tokens if body.get("logprobs") is not None else 0):
            return f"choice {i}: logprobs for {scored} of {tokens} tokens"
    return None


def one_request(port: int, rng: random.Random, args) -> tuple[str, str | None]:
    """(kind, problem): kind "ok" | "bad" | "gone"; problem None when all went as it should."""
    body = random_body(rng)
    if rng.random() < args.bad:
        change, fragment = rng.choice(BAD)
        conn = _post(port, {**body, **change, "stream": False})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ok = resp.status == 400 and fragment in raw.decode(errors="replace")
        return "bad", None if ok else f"provoked {change}: HTTP {resp.status} {raw[:200]!r}"
    conn = _post(port, dict(body))
    if rng.random() < args.disconnect:  # the client goes away mid-request
        if body["stream"]:
            resp = conn.getresponse()
            for _ in range(rng.randint(0, 3)):
                resp.readline()
        else:
            time.sleep(rng.uniform(0, 0.02))
        conn.close()
        return "gone", None
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return "ok", check_answer(body, resp.status, raw)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    out = conn.getresponse().read()
    conn.close()
    return out


def finished(port: int) -> dict[str, float]:
    """The server's requests by finish reason (its /metrics): "cancelled" counts the
    disconnects that reached the scheduler before the request was done."""
    head = 'arx_serve_requests_total{finish_reason="'
    return {line[len(head):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in _get(port, "/metrics").decode().splitlines() if line.startswith(head)}


def drive(port: int, pid: int, args) -> dict:
    """--clients threads share --requests requests; RSS once --warmup are done and at the end."""
    lock, counts, problems, rss = threading.Lock(), {"ok": 0, "bad": 0, "gone": 0}, [], {}
    todo = iter(range(args.requests))

    def client(c):
        rng = random.Random(args.seed * 1000 + c)
        while True:
            with lock:
                i = next(todo, None)
                if i == args.warmup:
                    rss["warm"] = rss_mib(pid)
            if i is None:
                return
            try:
                kind, problem = one_request(port, rng, args)
            except Exception as e:  # noqa: BLE001 - a failure of this request, reported
                kind, problem = "ok", f"request {i}: {type(e).__name__}: {e}"
            with lock:
                counts[kind] += 1
                if problem:
                    problems.append(problem)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    deadline, health = time.monotonic() + 30, json.loads(_get(port, "/health"))
    while (health["running"] or health["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.1)  # the last disconnects' cancellations land at the next step
        health = json.loads(_get(port, "/health"))
    rss["end"] = rss_mib(pid)
    return {"requests": args.requests, "wall_s": wall, "counts": counts, "problems": problems,
            "finished": finished(port),
            "rss_warm_mib": rss["warm"], "rss_end_mib": rss["end"],
            "rss_growth_mib": rss["end"] - rss["warm"], "rss_bound_mib": args.rss_bound,
            "health_end": health,
            "leaked_slots": health["max_batch"] - health["free_slots"] + health["waiting"]}


def failures(report: dict) -> list[str]:
    """The soak's verdict: empty when every check passed."""
    out = list(report["problems"][:10])
    if report["rss_growth_mib"] >= report["rss_bound_mib"]:
        out.append(f"RSS grew {report['rss_growth_mib']:.1f} MiB after warm-up "
                   f"(bound {report['rss_bound_mib']} MiB)")
    if report["leaked_slots"]:
        out.append(f"{report['leaked_slots']} slots still taken at the end: "
                   f"{report['health_end']}")
    return out


def tiny_bundle(cache_dir: str | Path) -> Path:
    """models/arx-tiny exported into cache_dir once (reused after)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    return bench_models.arx_bundle(TINY, cache / "arx-tiny-soak.arx", max_seq_len=512,
                                   reuse=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = Path(args.cache_dir)
    bundle = tiny_bundle(cache)
    server = argparse.Namespace(max_batch=args.max_batch, clients=[4 * args.clients],
                                threads=args.threads, prefill_chunk=None, prefill_chunk_idle=None)
    with open(cache / "soak.log", "ab") as log:
        proc, port = bench_serve.start_server(bundle, server, log)
        try:
            report = drive(port, proc.pid, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    report["failures"] = failures(report)
    c = report["counts"]
    print(f"{args.requests} requests in {report['wall_s']:.1f} s: {c['ok']} answered, {c['bad']} "
          f"provoked 400s, {c['gone']} clients gone; RSS {report['rss_warm_mib']:.1f} -> "
          f"{report['rss_end_mib']:.1f} MiB (bound +{args.rss_bound:g}); leaked slots "
          f"{report['leaked_slots']}; finished {report['finished']}")
    for f in report["failures"]:
        print("FAILED:", f)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
