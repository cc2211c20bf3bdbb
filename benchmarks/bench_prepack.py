"""Session open, prefill and multi-row steps with and without onnxruntime's weight prepacking.

    python benchmarks/bench_prepack.py BUNDLE                 # e.g. a bench_export 1B fp32 bundle
    python benchmarks/bench_prepack.py BUNDLE --rounds 2 --json out.json

For each round and each choice (unpacked, packed; interleaved), a child process opens a
DecoderSession of the bundle (timed), prefills a prompt of --prompt tokens and times steps of
1, 2, 5 and 8 new tokens after it (median of --steps each, the cache rolled back between
them), then reports its peak resident memory (ru_maxrss: a process of its own per choice, so
each peak is that session's). What it shows is the
trade `arx generate --prepack auto` makes (docs/design.md, "Prepacking at load"): the packed
copy speeds every call of 2+ rows and costs the open and memory; a one-row step is the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIDTHS = (1, 2, 5, 8)


def measure(bundle: Path, prepack: bool, prompt: int, steps: int, threads: int) -> dict:
    from arx.runtime.backend import BackendOptions
    from arx.runtime.decoder import DecoderSession

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with DecoderSession(bundle, BackendOptions(prepack=prepack, intra_op_threads=threads)) as s:
        opened = time.perf_counter() - t
        high = min(1000, s.manifest.vocab_size)  # random ids the table has
        ids = rng.integers(3, high, (1, prompt))
        cache = s.new_cache(1, prompt + max(WIDTHS) + 1)
        t = time.perf_counter()
        s.step(cache, ids, np.array([prompt]), logits="last")
        prefill = time.perf_counter() - t
        widths = {}
        for width in WIDTHS:
            times = []
            for _ in range(steps):
                block = rng.integers(3, high, (1, width))
                t = time.perf_counter()
                s.step(cache, block, np.array([width]), logits="last")
                times.append(time.perf_counter() - t)
                cache.rollback(np.array([prompt]))
            widths[width] = statistics.median(times) * 1e3
        cache.close()
    return {"prepack": prepack, "open_s": opened, "prefill_ms": prefill * 1e3,
            "step_ms_by_rows": widths,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def _child(args, prepack: bool) -> dict:
    cmd = [sys.executable, __file__, str(args.bundle), "--prompt", str(args.prompt), "--steps",
           str(args.steps), "--threads", str(args.threads), "--child", "on" if prepack else "off"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # errors show
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per width (median)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.bundle, args.child == "on", args.prompt, args.steps,
                                 args.threads)))
        return 0
    rows = []
    for _ in range(args.rounds):
        for prepack in (False, True):
            row = _child(args, prepack)
            rows.append(row)
            steps = ", ".join(f"{w} rows {ms:.1f}" for w, ms in row["step_ms_by_rows"].items())
            print(f"prepack {'on ' if prepack else 'off'}: open {row['open_s']:.2f} s, prefill "
                  f"{args.prompt} {row['prefill_ms']:.0f} ms, steps ms: {steps}, peak RSS "
                  f"{row['peak_rss_gb']:.2f} GB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
