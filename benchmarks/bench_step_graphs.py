"""Decode step time on the fused graph (GroupQueryAttention) vs the general-step graph.

    python benchmarks/bench_step_graphs.py                     # 125M Llama, buffers 256 and 2048
    python benchmarks/bench_step_graphs.py --buffers 256 --steps 40 --threads 2

The figure behind docs/design.md "Attention": single-token decode after a 128-token prompt,
batch 1, the two graphs alternated step by step on two caches of the same buffer length (so
drifting machine load hits both alike), medians and 10th percentiles in ms. The general graph
is forced for width-1 steps, which DecoderSession.step would otherwise give the fused one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402


def time_graphs(bundle: Path, buffer: int, steps: int, threads: int, prompt: int = 128) -> dict:
    from arx.runtime import decoder as dec
    from arx.runtime.backend import BackendOptions

    times = {"fused": [], "general": []}
    with dec.DecoderSession(bundle, BackendOptions(intra_op_threads=threads)) as s:
        caches = {}
        for graph in times:
            caches[graph] = s.new_cache(1, buffer)
            s.step(caches[graph], np.arange(1, prompt + 1)[None], np.array([prompt]), logits="last")
        fused_ok = dec._fused_ok
        try:
            for i in range(steps):
                for graph in times:
                    dec._fused_ok = fused_ok if graph == "fused" else (lambda *a: False)
                    t = time.perf_counter()
                    s.step(caches[graph], np.array([[5 + i % 50]]), np.ones(1, np.int64),
                           logits="last")
                    times[graph].append((time.perf_counter() - t) * 1e3)
        finally:
            dec._fused_ok = fused_ok
    return {g: {"median_ms": statistics.median(v), "p10_ms": float(np.percentile(v, 10))}
            for g, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="125m", choices=sorted(bench_models.SHAPES))
    p.add_argument("--buffers", default="256,2048", help="cache buffer lengths to time")
    p.add_argument("--steps", type=int, default=88)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "arx-bench"))
    args = p.parse_args(argv)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    buffers = [int(b) for b in args.buffers.split(",")]
    shape = bench_models.SHAPES[args.shape]
    hf = bench_models.hf_folder(shape, cache)
    bundle = bench_models.arx_bundle(hf, cache / f"arx-{hf.name}-{max(buffers)}.arx",
                                     max_seq_len=max(buffers), reuse=True)
    print(f"{'buffer':>7} {'fused median':>13} {'p10':>7} {'general median':>15} {'p10':>7}  ms")
    for buffer in buffers:
        r = time_graphs(bundle, buffer, args.steps, args.threads)
        print(f"{buffer:>7} {r['fused']['median_ms']:>13.1f} {r['fused']['p10_ms']:>7.1f} "
              f"{r['general']['median_ms']:>15.1f} {r['general']['p10_ms']:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
