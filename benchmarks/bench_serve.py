"""Load test of `arx serve`: concurrent streaming clients against one server process.

    python benchmarks/bench_serve.py                              # 125M Llama, 1/4/16/64 clients
    python benchmarks/bench_serve.py --clients 1,16 --json serve.json
    python benchmarks/bench_serve.py --shape tiny --clients 1,2 --prompt-len 8 --new-tokens 6
    python benchmarks/bench_serve.py --clients 1,4,16 --requests 2 --prefill-chunk 64   # a policy
    python benchmarks/bench_serve.py --step-shapes      # ms per step of each shape the policy picks
    python benchmarks/bench_serve.py --llama-cpp q4_0   # + llama.cpp's server, same clients, same weights

Issue 11's figures: each client sends --requests streamed completions one after the other
(--prompt-len random token ids, --new-tokens new tokens, greedy, EOS ignored); per client count
it reports requests/s, output tokens/s, time to first token and inter-token latency p50/p99,
and checks the goals (tokens/s at 16 clients >= 4x one client; p99 inter-token latency at 16
clients < 3x one client's). The server runs as `arx serve` in its own process, so the clients'
Python does not share its GIL. Run it on a quiet machine: the 125M run takes ~10-20 minutes on
a few cores. --llama-cpp f16|q8_0|q4_0 then runs llama-cpp-python's server (the `llamacpp`
extra, [server]) on the GGUF of the same weights (llama_cpp_engine.py) through the same client
levels: text prompts of the same ids (it takes no ids), one chunk per token, min_tokens =
max_tokens so EOS cannot end a request, requests queued rather than interrupted. That server
runs one request at a time (no batching); llama.cpp's C++ llama-server, which batches, is not
in the wheel.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402
import llama_cpp_engine  # noqa: E402

GOALS = ((16, "output_tokens_per_s", ">=", 4.0), (16, "itl_p99_ms", "<", 3.0))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="125m", choices=sorted(bench_models.SHAPES))
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="the server's intra-op threads")
    p.add_argument("--prefill-chunk", type=int, help="the server's (default: arx serve's)")
    p.add_argument("--prefill-chunk-idle", type=int, help="the server's (default: arx serve's)")
    p.add_argument("--step-shapes", action="store_true",
                   help="no server: time the steps a prefill policy can pick, on the bundle")
    p.add_argument("--llama-cpp", choices=llama_cpp_engine.WEIGHTS,
                   help="also load-test llama.cpp's server on this GGUF of the same weights")
    p.add_argument("--llama-cpp-kv", default="f16", choices=("f16", "q8_0"),
                   help="its KV cache type (default f16, llama.cpp's own)")
    p.add_argument("--llama-cpp-src", default="", help="llama-cpp-python's unpacked sdist, for "
                   f"llama.cpp's converter (default: ${llama_cpp_engine.SRC_ENV})")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "arx-bench"))
    p.add_argument("--json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if min(args.clients) < 1 or args.requests < 1 or args.prompt_len < 1 or args.new_tokens < 1:
        p.error("--clients, --requests, --prompt-len and --new-tokens must be >= 1")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, args, log) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    cmd = [sys.executable, "-m", "arx", "serve", str(bundle), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(max(args.clients)),
           "--threads", str(args.threads), "--model-name", "bench"]
    for flag in ("prefill_chunk", "prefill_chunk_idle"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return _launch(cmd, port, "/health", log, "arx serve")


def start_llama_server(gguf: Path, args, log) -> tuple[subprocess.Popen, int]:
    """llama-cpp-python's server on `gguf`, one context of prompt + new tokens."""
    port = _free_port()
    threads = args.threads or len(os.sched_getaffinity(0))
    cmd = llama_cpp_engine.server_command(gguf, port, threads, args.prompt_len + args.new_tokens,
                                          args.llama_cpp_kv)
    return _launch(cmd, port, "/v1/models", log, "llama.cpp's server")


def _launch(cmd: list[str], port: int, ready: str, log, name: str) -> tuple[subprocess.Popen, int]:
    """Start `cmd` and wait until GET `ready` answers 200 (5 minutes at most)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", ready)
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not start (exit {proc.poll()}); see {log.name}")
        time.sleep(0.2)


def request_body(peer: str, prompt: list[int], new_tokens: int) -> dict:
    """A greedy streamed completion of `new_tokens` that EOS cannot end, as each server takes it:
    arx takes the ids; llama.cpp's server takes text only (the same ids as the benchmark
    tokenizer's words) and ignores EOS through min_tokens."""
    if peer == "llama.cpp":
        return {"model": "bench", "prompt": llama_cpp_engine.prompt_text(prompt),
                "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0,
                "stream": True}
    return {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}


def chunk_tokens(peer: str, chunk: dict) -> int:
    """Tokens a streamed chunk carries: arx lists their ids; llama.cpp's server sends one
    chunk per token and a last one, with the finish reason, that carries none."""
    choice = chunk["choices"][0]
    if peer == "llama.cpp":
        return int(choice["finish_reason"] is None)
    return len(choice["token_ids"])


def one_request(port: int, prompt: list[int], new_tokens: int, peer: str = "arx") -> dict:
    """A streamed completion: (time to first token, gaps between tokens, tokens) of one request."""
    body = json.dumps(request_body(peer, prompt, new_tokens))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    stamps = []
    for line in resp:
        if line.startswith(b"data: {"):
            n = chunk_tokens(peer, json.loads(line[6:]))
            stamps += [time.perf_counter()] * n
    conn.close()
    return {"ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": len(stamps), "total": time.perf_counter() - t0}


def run_level(port: int, clients: int, args, vocab: int, peer: str = "arx") -> dict:
    import random

    results, errors = [], []

    def client(seed):
        rng = random.Random(seed)
        for _ in range(args.requests):
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            try:
                results.append(one_request(port, prompt, args.new_tokens, peer))
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    gaps = sorted(g for r in results for g in r["gaps"])
    ttft = sorted(r["ttft"] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": errors,
            "requests_per_s": len(results) / wall,
            "output_tokens": sum(r["tokens"] for r in results),
            "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99),
            "itl_mean_ms": statistics.fmean(gaps) * 1e3 if gaps else float("nan")}


def step_shapes(bundle: Path, args, vocab: int, reps: int = 5) -> list[dict]:
    """Best-of-reps ms of each step shape a prefill policy can pick, every row of a
    --max-batch cache holding a --prompt-len past: the batched decode step over n rows, a
    batch-1 prefill chunk of C tokens over one row (alone, or after a past of 64), and that
    chunk fused into the decode step (one row C tokens, the others 1: the general-step graph)."""
    import numpy as np

    from arx.runtime.backend import BackendOptions
    from arx.runtime.decoder import DecoderSession

    rng, b = np.random.default_rng(0), args.max_batch
    out = []
    with DecoderSession(bundle, BackendOptions(intra_op_threads=args.threads)) as s:
        cache = s.new_cache(b, s.kv.max_seq_len)
        s.step(cache, rng.integers(3, vocab, (b, args.prompt_len)), np.full(b, args.prompt_len),
               logits="none")
        full = cache.lengths.copy()

        def timed(name, view, width, new_lens, past):
            times = []
            for _ in range(reps):  # the lengths are reset, the buffers hold a past of that size
                cache.lengths = full.copy()
                cache.lengths[-1] = past
                ids = rng.integers(3, vocab, (len(new_lens), width))
                t0 = time.perf_counter()
                s.step(view, ids, new_lens, logits="last")
                times.append(time.perf_counter() - t0)
            cache.lengths = full.copy()
            out.append({"shape": name, "ms": min(times) * 1e3})

        for n in sorted({1, b // 2, b} - {0}):
            view = cache if n == b else cache.rows(0, n)
            timed(f"decode {n} rows", view, 1, np.ones(n, np.int64), args.prompt_len)
        for c in (8, 16, 32, 64):
            for past in (0, 64):
                timed(f"prefill chunk {c} past {past}", cache.row(b - 1), c, np.array([c]), past)
            fused = np.ones(b, np.int64)
            fused[-1] = c
            timed(f"decode {b - 1} rows + chunk {c} fused", cache, c, fused, 64)
    return out


def goals(levels: dict[int, dict]) -> list[dict]:
    """Each goal as a ratio of the level's figure over one client's, where both were run."""
    out = []
    for clients, key, op, target in GOALS:
        if clients in levels and 1 in levels:
            ratio = levels[clients][key] / levels[1][key]
            ok = ratio >= target if op == ">=" else ratio < target
            out.append({"clients": clients, "figure": key, "ratio_vs_1": ratio,
                        "goal": f"{op} {target}", "met": ok})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = bench_models.SHAPES[args.shape]
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    hf = bench_models.hf_folder(shape, cache)
    seq = args.prompt_len + args.new_tokens
    bundle = bench_models.arx_bundle(hf, cache / f"{hf.name}-serve-{seq}.arx", max_seq_len=seq,
                                     reuse=True)
    if args.step_shapes:
        rows = step_shapes(bundle, args, shape.vocab)
        for r in rows:
            print(f"{r['shape']:<34} {r['ms']:8.1f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    # the GGUF first: a missing converter stops the run before the arx load test
    peer = llama_gguf(args, hf, shape)
    levels = load_test(lambda log: start_server(bundle, args, log), args, shape.vocab, "arx")
    if isinstance(peer, Path):
        theirs = load_test(lambda log: start_llama_server(peer, args, log), args, shape.vocab,
                           "llama.cpp")
        peer = {"weights": args.llama_cpp, "kv_cache": args.llama_cpp_kv, "gguf": str(peer),
                "levels": list(theirs.values()), "goals": goals(theirs)}
    report = {"shape": args.shape, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "max_batch": args.max_batch, "cpus": os.cpu_count(), "levels": list(levels.values()),
              "goals": goals(levels), "llama_cpp": peer}
    print_levels("arx serve", levels)
    if isinstance(peer, dict):
        theirs = {lv["clients"]: lv for lv in peer["levels"]}
        print_levels(f"llama.cpp's server ({peer['weights']} weights, {peer['kv_cache']} cache)",
                     theirs)
        for n in (n for n in levels if n in theirs):
            ratio = levels[n]["output_tokens_per_s"] / theirs[n]["output_tokens_per_s"]
            print(f"arx / llama.cpp output tokens/s at {n} clients: {ratio:.2f}x")
    else:
        print(f"llama.cpp: {peer}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    errors = [r["errors"] for r in levels.values()]
    errors += [r["errors"] for r in peer["levels"]] if isinstance(peer, dict) else []
    return 1 if any(errors) else 0


def load_test(start, args, vocab: int, peer: str) -> dict[int, dict]:
    """Every client level against one server process, `start(log)` -> (process, port)."""
    with open(Path(args.cache_dir) / "serve.log", "ab") as log:
        proc, port = start(log)
        try:
            levels = {}
            for clients in args.clients:
                levels[clients] = run_level(port, clients, args, vocab, peer)
                if not args.quiet:
                    print(json.dumps({"server": peer, **levels[clients]}), file=sys.stderr,
                          flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return levels


LLAMA_SERVER_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")


def llama_gguf(args, hf: Path, shape) -> Path | str:
    """The GGUF of the same weights for llama.cpp's server, or why it is not run."""
    if args.llama_cpp is None:
        return "not run (--llama-cpp f16|q8_0|q4_0 runs its server on the same weights)"
    missing = [m for m in LLAMA_SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (f"not run: {', '.join(missing)} not installed (pip install 'arx[llamacpp]' with "
                "the CMAKE_ARGS of README, Install)")
    threads = args.threads or len(os.sched_getaffinity(0))
    return llama_cpp_engine.gguf_files(hf, [args.llama_cpp], shape.vocab, src=args.llama_cpp_src,
                                       log=Path(args.cache_dir) / "serve.log",
                                       threads=threads)[args.llama_cpp]


def print_levels(title: str, levels: dict[int, dict]) -> None:
    print(f"{title}\n{'clients':>7} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8}  ms, errors")
    for r in levels.values():
        print(f"{r['clients']:>7} {r['requests_per_s']:>7.2f} {r['output_tokens_per_s']:>10.1f} "
              f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} {r['itl_p50_ms']:>8.1f} "
              f"{r['itl_p99_ms']:>8.1f}  {len(r['errors'])}")
    for g in goals(levels):
        print(f"goal: {g['figure']} at {g['clients']} clients / 1 client = {g['ratio_vs_1']:.2f} "
              f"({g['goal']}): {'met' if g['met'] else 'NOT met'}")


if __name__ == "__main__":
    raise SystemExit(main())
