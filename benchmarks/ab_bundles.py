"""Decode speed of several arx bundles timed turn by turn in one process: an A/B of two exports
of the same model, or the same bundle given twice to see this machine's noise floor.

    python benchmarks/ab_bundles.py A.arx B.arx [--runs 5] [--new-tokens 128] [--prompt-len 128]
    python benchmarks/ab_bundles.py X.arx X.arx      # the same bundle twice: the noise

Every bundle gets its own session (bench_decode's arx engine), one warm-up run, then --runs
rounds in which each bundle decodes the same greedy prompt once; --reverse runs each round
in reverse order, to tell the order of sessions from the bundles. Prints each bundle's decode
tokens/s per run and the median, and the median ratio to the first bundle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_engines  # noqa: E402


def measure(bundles: list[Path], runs: int, prompt_len: int, new_tokens: int, threads: int,
            reverse: bool = False) -> list[dict]:
    engines = [decode_engines.ArxEngine(b, threads) for b in bundles]
    prompt = [5 + i % 97 for i in range(prompt_len)]
    try:
        for e in engines:
            e.run(prompt, min(new_tokens, 16))  # warm-up
        speeds: list[list[float]] = [[] for _ in engines]
        order = list(range(len(engines)))[::-1 if reverse else 1]
        for _ in range(runs):
            for i in order:
                speeds[i].append(engines[i].run(prompt, new_tokens).decode_tokens_per_s)
    finally:
        for e in engines:
            e.close()
    base = statistics.median(speeds[0])
    return [{"bundle": str(b), "tokens_per_s": [round(x, 2) for x in s],
             "median": round(statistics.median(s), 2),
             "vs_first": round(statistics.median(s) / base, 3)} for b, s in zip(bundles, speeds)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reverse", action="store_true", help="run each round in reverse order")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.runs < 1 or args.new_tokens < 2 or args.prompt_len < 1:
        p.error("--runs and --prompt-len must be >= 1, --new-tokens >= 2")
    rows = measure(args.bundles, args.runs, args.prompt_len, args.new_tokens, args.threads,
                   args.reverse)
    for r in rows:
        print(f"{r['bundle']}: median {r['median']} tok/s ({r['vs_first']}x the first), "
              f"runs {r['tokens_per_s']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
