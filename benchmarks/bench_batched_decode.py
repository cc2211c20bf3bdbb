"""Does batched decode pay off? One decode step at batch 1 and at batch B (default 8) per bundle
variant, the variants interleaved round by round (issue 11: w4 batch 8 gave 1.5x batch 1).

    python benchmarks/bench_batched_decode.py                       # 125m: fp32, w4 and its knobs
    python benchmarks/bench_batched_decode.py --variants w4,w4-level1 --threads 2 --ops

Each (variant, batch) session prefills a random `--prompt-len` prompt once; every round times
`--steps` decode steps of the whole batch, then rolls the cache back to the prompt, so every
round sees the same pasts. Per step it records wall time and the process's CPU time: on a
shared machine the wall time of a step depends on the other jobs, but with one intra-op thread
(the default) and no spin-waiting, CPU time is the work the step costs, which is what a batch
can amortize. The ratio is batch-B tokens/s over batch-1 tokens/s (B x t1 / tB), per round,
reported as the median and min-max over rounds. `--ops` adds ORT's own per-op split (ms per
step) at both batches. Variants are made by arx.calibration in the bench cache (bench_models).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402

# name -> (scheme, QuantOptions overrides, KV cache dtype); "w4" is arx calibrate's default
VARIANTS = {
    "fp32": (None, {}, "fp32"),
    "w4": ("w4", {}, "fp32"),
    "w4-level1": ("w4", {"accuracy_level": 1}, "fp32"),  # fp32 compute
    "w4-level0": ("w4", {"accuracy_level": 0}, "fp32"),  # unset: ORT's choice
    "w4-g32": ("w4", {"group_size": 32}, "fp32"),
    "w4-g64": ("w4", {"group_size": 64}, "fp32"),
    "w4-g256": ("w4", {"group_size": 256}, "fp32"),
    "w4-fp32-head": ("w4", {"quantize_lm_head": False}, "fp32"),
    "w4-kv8": ("w4", {}, "int8"),
    "w4-g256-kv8": ("w4", {"group_size": 256}, "int8"),
    "w8": ("w8", {}, "fp32"),
}
DEFAULT_VARIANTS = ("fp32", "w4", "w4-level1", "w4-g32", "w4-g64", "w4-fp32-head", "w4-kv8")


@dataclass(frozen=True)
class Config:
    shape: str = "125m"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    batch: int = 8
    prompt_len: int = 128
    steps: int = 12
    rounds: int = 7
    threads: int = 1
    spin: bool = False
    ops: bool = False
    cache_dir: str = str(Path.home() / ".cache" / "arx-bench")
    reuse_bundles: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.shape not in bench_models.SHAPES:
            raise SystemExit(f"unknown --shape {self.shape}; known: {', '.join(bench_models.SHAPES)}")
        for v in self.variants:
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v}; known: {', '.join(VARIANTS)}")
        if self.batch < 2 or min(self.prompt_len, self.steps, self.rounds, self.threads) < 1:
            raise SystemExit("--batch must be >= 2; --prompt-len, --steps, --rounds, --threads >= 1")


def bundles(cfg: Config) -> dict[str, Path]:
    """Every variant's bundle, made once in the cache (the fp32 export first)."""
    shape = bench_models.SHAPES[cfg.shape]
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    hf = bench_models.hf_folder(shape, cache, cfg.seed)
    max_seq = cfg.prompt_len + cfg.steps + 1
    # the decode benchmark's context (prompt 128 + 128 new) when it is enough, to share its bundles
    max_seq = max(max_seq, 256) if cfg.shape == "125m" else max_seq
    fp32 = bench_models.arx_bundle(hf, cache / f"arx-{hf.name}-{max_seq}.arx", max_seq_len=max_seq,
                                   reuse=cfg.reuse_bundles)
    out = {}
    for v in cfg.variants:
        scheme, quant, kv = VARIANTS[v]
        out[v] = fp32 if scheme is None else bench_models.arx_quantized(
            fp32, fp32.with_name(f"{fp32.stem}-{v}.arx"), scheme, reuse=cfg.reuse_bundles,
            kv_dtype=kv, **quant)
    return out


class Timed:
    """One session and cache at one batch, prefilled once; `round()` times `steps` steps."""

    def __init__(self, bundle: Path, batch: int, cfg: Config, rng):
        import numpy as np

        from arx.runtime.backend import BackendOptions
        from arx.runtime.decoder import DecoderSession

        self.np, self.rng, self.batch, self.cfg = np, rng, batch, cfg
        self.session = DecoderSession(bundle, BackendOptions(intra_op_threads=cfg.threads,
                                                             spin_wait=cfg.spin))
        self.vocab = self.session.manifest.vocab_size
        self.cache = self.session.new_cache(batch, cfg.prompt_len + cfg.steps + 1)
        prompt = rng.integers(0, self.vocab, (batch, cfg.prompt_len))
        self.session.step(self.cache, prompt, np.full(batch, cfg.prompt_len), logits="last")
        self.wall_ms: list[float] = []
        self.cpu_ms: list[float] = []

    def round(self) -> None:
        np, b = self.np, self.batch
        ids, ones = self.rng.integers(0, self.vocab, (b, 1)), np.ones(b, np.int64)
        wall, cpu = [], []
        for _ in range(self.cfg.steps):
            t, c = time.perf_counter(), time.process_time()
            self.session.step(self.cache, ids, ones, logits="last")
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        self.cache.rollback(np.full(b, self.cfg.prompt_len, np.int64))
        self.wall_ms.append(statistics.median(wall) * 1e3)
        self.cpu_ms.append(statistics.median(cpu) * 1e3)

    def close(self) -> None:
        self.cache.close()
        self.session.__exit__()


def measure(cfg: Config, paths: dict[str, Path]) -> dict[str, dict]:
    """`rounds` rounds; in each, every (variant, batch) runs once, each round starting one later."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    timed = {(v, b): Timed(paths[v], b, cfg, rng) for v in cfg.variants for b in (1, cfg.batch)}
    keys = list(timed)
    try:
        for r in range(cfg.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                timed[key].round()
    finally:
        for t in timed.values():
            t.close()
    return {v: summary(timed[(v, 1)], timed[(v, cfg.batch)], cfg.batch) for v in cfg.variants}


def summary(one: Timed, many: Timed, batch: int) -> dict:
    out = {}
    for kind in ("wall", "cpu"):
        t1, tb = getattr(one, f"{kind}_ms"), getattr(many, f"{kind}_ms")
        ratios = [batch * a / b for a, b in zip(t1, tb)]
        out[kind] = {"batch1_ms": statistics.median(t1), "batch1_range": [min(t1), max(t1)],
                     "batchB_ms": statistics.median(tb), "batchB_range": [min(tb), max(tb)],
                     "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
    return out


def op_split(cfg: Config, bundle: Path, batch: int) -> dict[str, float]:
    """ORT's per-op time of `steps` decode steps after the prefill: ms per step by op type."""
    import numpy as np

    from arx.manifest import read_manifest
    from arx.runtime.backend import BackendOptions
    from arx.runtime.profiler import OrtTraceProfiler

    manifest = read_manifest(bundle)
    prof = OrtTraceProfiler(bundle, manifest, BackendOptions(intra_op_threads=cfg.threads,
                                                             spin_wait=cfg.spin))
    s, rng, vocab = prof.session, np.random.default_rng(cfg.seed), manifest.vocab_size
    cache = s.new_cache(batch, cfg.prompt_len + cfg.steps + 1)
    s.step(cache, rng.integers(0, vocab, (batch, cfg.prompt_len)), np.full(batch, cfg.prompt_len),
           logits="last")
    for _ in range(cfg.steps):
        s.step(cache, rng.integers(0, vocab, (batch, 1)), np.ones(batch, np.int64), logits="last")
    ops = prof.op_breakdown(["prefill"] + ["decode"] * cfg.steps)["decode"]
    return {o.op_type: o.total_ms / cfg.steps for o in ops}


def format_report(report: dict) -> str:
    b, cfg = report["config"]["batch"], report["config"]
    lines = [f"decode step at past {cfg['prompt_len']}, batch 1 vs {b}: ms (median of {cfg['steps']} "
             f"steps per round, median over {cfg['rounds']} interleaved rounds, min-max), "
             f"{cfg['threads']} thread(s){'' if cfg['spin'] else ', no spin'}, load "
             f"{report['load'][0]:.1f} before / {report['load'][1]:.1f} after; "
             f"ratio = batch-{b} tokens/s over batch-1",
             f"{'variant':14s} {'time':4s} {'batch 1':>20s} {f'batch {b}':>22s} {'ratio':>20s}"]
    for v, r in report["results"].items():
        for kind in ("wall", "cpu"):
            x = r[kind]
            rng1, rngb, rr = x["batch1_range"], x["batchB_range"], x["ratio_range"]
            lines.append(f"{v:14s} {kind:4s} {x['batch1_ms']:8.2f} ({rng1[0]:.1f}-{rng1[1]:.1f})"
                         f" {x['batchB_ms']:9.2f} ({rngb[0]:.1f}-{rngb[1]:.1f})"
                         f" {x['ratio']:6.2f}x ({rr[0]:.2f}-{rr[1]:.2f})")
    for v, per_batch in report.get("ops", {}).items():
        for batch, ops in per_batch.items():
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:5])
            lines.append(f"  ops {v} batch {batch} (ms/step): {top}")
    return "\n".join(lines)


def run(cfg: Config) -> dict:
    paths = bundles(cfg)
    load0 = os.getloadavg()[0]
    results = measure(cfg, paths)
    report = {"config": cfg.__dict__, "bundles": {v: str(p) for v, p in paths.items()},
              "results": results}
    if cfg.ops:
        report["ops"] = {v: {str(b): op_split(cfg, paths[v], b) for b in (1, cfg.batch)}
                         for v in cfg.variants}
    report["load"] = [load0, os.getloadavg()[0]]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="125m", choices=sorted(bench_models.SHAPES))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=", ".join(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--spin", action="store_true", help="let ORT's idle threads spin (arx's default)")
    p.add_argument("--ops", action="store_true", help="add ORT's per-op split at both batches")
    p.add_argument("--cache-dir", default=Config.cache_dir)
    p.add_argument("--fresh-bundles", action="store_true", help="re-make the cached bundles")
    p.add_argument("--json")
    a = p.parse_args(argv)
    cfg = Config(shape=a.shape, variants=tuple(x for x in a.variants.split(",") if x), batch=a.batch,
                 prompt_len=a.prompt_len, steps=a.steps, rounds=a.rounds, threads=a.threads,
                 spin=a.spin, ops=a.ops, cache_dir=a.cache_dir, reuse_bundles=not a.fresh_bundles)
    report = run(cfg)
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
