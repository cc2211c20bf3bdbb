"""The prefill policy replayed on a cost model: arx serve's own scheduler, on a virtual clock.

    python benchmarks/serve_policy_model.py                        # chunks 8, 16, 24, 32, 64
    python benchmarks/serve_policy_model.py --chunks 16,64 --requests 8

bench_serve.py's clients (1 and 16 of them, --requests streamed completions each, 128-token
prompts, 128 new tokens, max-batch 16), but no HTTP and no wall clock: the real Scheduler runs
its real steps on models/arx-tiny (for the tokens and the cache lengths), and each step is
charged the time the 134M benchmark model takes for that shape, interpolated from
`bench_serve.py --step-shapes` figures (--decode-ms, --prefill-ms; the defaults were measured on
the 2-core machine). So the policy can be compared on a machine too busy to time it: per chunk,
output tokens/s, TTFT and inter-token latency p50/p99, and the issue's two ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import soak_serve  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", default="8,16,24,32,64")
    p.add_argument("--idle-chunk", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="per client, one after another")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--decode-ms", default="1:16.1,8:44.0,16:48.5", help="rows:ms of a decode step")
    p.add_argument("--prefill-ms", default="8:19.8,16:25.2,32:42.5,64:67.5",
                   help="tokens:ms of a batch-1 prefill chunk after a past")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "arx-bench"))
    args = p.parse_args(argv)
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.decode_ms, args.prefill_ms = _points(args.decode_ms), _points(args.prefill_ms)
    return args


def _points(text: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(map(float, pair.split(":")) for pair in text.split(",")))
    return np.array(xs), np.array(ys)


def _interp(points, x: float) -> float:
    """Piecewise linear, extended past the last point along the last segment."""
    xs, ys = points
    if x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(ys[-1] + slope * (x - xs[-1]))


class Charged:
    """The session, with each step charged its modelled time on a virtual clock."""

    def __init__(self, session, args):
        self.inner, self.args, self.now = session, args, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, cache, ids, new_lens, **kw):
        rows, width = ids.shape
        self.now += (_interp(self.args.decode_ms, rows) if width == 1 else
                     _interp(self.args.prefill_ms, width)) / 1e3
        return self.inner.step(cache, ids, new_lens, **kw)


def replay(session, args, clients: int, chunk: int) -> dict:
    """Closed-loop clients through the real scheduler; times from the virtual clock."""
    from arx.serve.scheduler import Request, Scheduler

    charged = Charged(session, args)
    sched = Scheduler(charged, args.max_batch, chunk=chunk, idle_chunk=args.idle_chunk,
                      max_queue=clients)
    rng, stamps, pending = np.random.default_rng(0), {}, []
    left = {c: args.requests for c in range(clients)}

    def send(c):
        left[c] -= 1
        prompt = [int(t) for t in rng.integers(3, 1000, args.prompt_len)]
        r = Request(prompt, args.new_tokens, stop_on_eos=False, on_event=lambda e: on(c, e))
        stamps[r.id] = [charged.now]
        sched.submit(r)

    def on(c, event):
        if event.kind == "token":
            stamps[event.request_id].append(charged.now)
        elif left[c]:
            pending.append(c)  # the client's next request, once this step is over

    for c in range(clients):
        send(c)
    while sched.step():
        while pending:
            send(pending.pop())
    sched.cache.close()
    ttft = sorted(s[1] - s[0] for s in stamps.values())
    gaps = sorted(g for s in stamps.values() for g in np.diff(s[1:]))
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3  # noqa: E731
    return {"clients": clients, "chunk": chunk,
            "tokens_per_s": sum(len(s) - 1 for s in stamps.values()) / charged.now,
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from arx.runtime.decoder import DecoderSession

    bundle = soak_serve.tiny_bundle(args.cache_dir)
    print(f"{'chunk':>5} {'clients':>7} {'tok/s':>7} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} "
          f"{'p99':>7}  ms   16 vs 1 client: tok/s, ITL p99")
    with DecoderSession(bundle) as session:
        for chunk in args.chunks:
            one, many = (replay(session, args, n, chunk) for n in (1, 16))
            for r in (one, many):
                ratios = "" if r is one else \
                    f"   {many['tokens_per_s'] / one['tokens_per_s']:.2f}x, " \
                    f"{many['itl_p99_ms'] / one['itl_p99_ms']:.2f}x"
                print(f"{chunk:>5} {r['clients']:>7} {r['tokens_per_s']:>7.1f} "
                      f"{r['ttft_p50_ms']:>9.0f} {r['ttft_p99_ms']:>8.0f} {r['itl_p50_ms']:>8.1f} "
                      f"{r['itl_p99_ms']:>7.1f}{ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
