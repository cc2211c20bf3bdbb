"""Memory of a bundle's decode session: what a bundle's weight layout costs at run time.

    python benchmarks/session_memory.py A.arx B.arx ...

Each bundle is opened in a child process of its own (so one's pages never count for the
next), prefills a prompt of --prompt-len ids, decodes --steps tokens, and reports its peak
resident memory (ru_maxrss) and, at the end, the resident memory split as /proc/self/status
gives it: RssAnon (memory only this process holds) and RssFile (clean pages of mapped files,
the bundle's, which the kernel may drop and read again). docs/design.md, "w4's token
embedding is int4 too", compares the embedding's forms with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys
import numpy as np
from arx.runtime.decoder import DecoderSession
bundle, prompt, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with DecoderSession(bundle) as s:
    cache = s.new_cache(1, prompt + steps)
    s.step(cache, np.arange(1, prompt + 1)[None] % s.manifest.vocab_size, np.array([prompt]))
    for _ in range(steps):
        s.step(cache, np.array([[7]]), np.array([1]), logits="last")
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    kb = lambda key: int(status[key].split()[0]) * 1024
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss": kb("VmRSS"), "anon": kb("RssAnon"), "file": kb("RssFile")}))
"""


def measure(bundle: Path, prompt_len: int, steps: int) -> dict:
    bundle = Path(bundle).resolve()  # the child runs in the checkout
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(prompt_len), str(steps)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in Path(bundle).rglob("*") if f.is_file())
    return {"bundle": str(bundle), "bundle_bytes": size, **row}


def table(rows: list[dict]) -> str:
    gb = 1 << 30  # as bench_export.py's GB
    lines = [f"{'bundle':<40}{'on disk GB':>11}{'peak GB':>9}{'anon GB':>9}{'file GB':>9}"]
    for r in rows:
        lines.append(f"{Path(r['bundle']).name:<40}{r['bundle_bytes'] / gb:>11.2f}"
                     f"{r['peak'] / gb:>9.2f}{r['anon'] / gb:>9.2f}{r['file'] / gb:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = [measure(b, args.prompt_len, args.steps) for b in args.bundles]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
