"""Decode speed: arx vs HF eager vs onnxruntime-genai vs llama.cpp, on the same random weights.

    python benchmarks/bench_decode.py                         # fp32, ~125M Llama, prompt 128, 128 new
    python benchmarks/bench_decode.py --variants fp32,w8,w4   # + arx w8/w4 and ort-genai int4
    python benchmarks/bench_decode.py --json out.json --plot out.png
    ARX_LLAMA_CPP_SRC=DIR python benchmarks/bench_decode.py --variants fp32,w4,w4-kv8 --prompt-len 1900

Issue 2 item 10 and issue 3's speed goals: CPU, batch 1, greedy, EOS disabled; time to first
token and decode tokens/s, medians over --runs runs after --warmup runs, all engines in one
run (interleaved run by run, so drifting machine load hits each the same), the same intra-op
thread count everywhere. It also checks that arx's greedy tokens equal HF's.
llama.cpp (llama_cpp_engine.py, the `llamacpp` extra) runs f16 always, q8_0 for w8 and q4_0 with
an f16 and a q8_0 cache (q4_0, q4_0-kv8) for any w4 variant; it is skipped, with a line saying
so, where llama_cpp does not import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402
import decode_engines  # noqa: E402
import llama_cpp_engine  # noqa: E402

VARIANTS = ("fp32", "w8", "w4", "w4-kv16", "w4-kv8")  # -kvN: w4 with an fp16 / int8 KV cache
KV_VARIANTS = {"16": "fp16", "8": "int8"}
# (numerator, denominator, goal): decode tokens/s ratios the issues set goals for
GOALS = (
    ("arx fp32", "ort-genai fp32", 1.0),
    ("arx fp32", "hf-eager fp32", 2.0),
    ("arx w4", "ort-genai int4", 1.0),
    ("arx w8", "arx fp32", 2.5),
    ("arx w4", "llama.cpp q4_0", 1.5),  # issue 16 sets it at prompt 1900, llama.cpp's default cache
)
QUANTIZED = ("w8", "w4", "int4", "q8_0", "q4_0")  # variant prefixes: greedy tokens may differ


@dataclass(frozen=True)
class BenchConfig:
    shape: str = "125m"
    prompt_len: int = 128
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    threads: int = 0  # 0: the CPUs this process may run on
    variants: tuple[str, ...] = ("fp32",)
    engines: tuple[str, ...] = ("arx", "hf-eager", "ort-genai", "llama.cpp")
    llama_cpp_src: str = ""  # llama.cpp's converter (llama_cpp_engine.converter_dir)
    cache_dir: str = str(Path.home() / ".cache" / "arx-bench")
    reuse_bundles: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.shape not in bench_models.SHAPES:
            raise SystemExit(f"unknown --shape {self.shape}; known: {', '.join(bench_models.SHAPES)}")
        if min(self.prompt_len, self.new_tokens, self.runs) < 1 or self.warmup < 0:
            raise SystemExit("--prompt-len, --new-tokens, --runs must be >= 1 and --warmup >= 0")
        if self.new_tokens < 2:
            raise SystemExit("--new-tokens must be >= 2 (decode speed needs two tokens)")
        for v in self.variants:
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v}; known: {', '.join(VARIANTS)}")
        for e in self.engines:
            if e not in decode_engines.ENGINES:
                raise SystemExit(f"unknown engine {e}; known: {', '.join(decode_engines.ENGINES)}")

    @property
    def n_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


@dataclass
class Target:
    """One thing timed: an engine on one artifact."""

    engine: str
    variant: str
    path: Path
    options: dict = field(default_factory=dict)  # the engine's keyword arguments
    ttft_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.engine} {self.variant}"

    def summary(self) -> dict:
        ttft = statistics.median(self.ttft_s)
        tps = statistics.median(self.decode_tps)
        return {"engine": self.engine, "variant": self.variant, "artifact": str(self.path),
                "ttft_ms": ttft * 1e3, "decode_tokens_per_s": tps, "ms_per_token": 1e3 / tps,
                "runs_ttft_ms": [t * 1e3 for t in self.ttft_s], "runs_decode_tokens_per_s": self.decode_tps}


def prepare(cfg: BenchConfig, log: Path) -> tuple[list[Target], dict]:
    """Make the weights and every artifact; returns the targets and model facts."""
    from arx.progress import Steps

    shape = bench_models.SHAPES[cfg.shape]
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    want_og = "ort-genai" in cfg.engines
    llama, _ = llama_plan(cfg)
    n_steps = (1 + ("arx" in cfg.engines) * len(cfg.variants)
               + want_og * (1 + _int4(cfg)) + bool(llama))
    steps = Steps(n_steps, enabled=cfg.progress)
    with steps.step(f"random {cfg.shape} {shape.family} weights (cached in {cache})"):
        hf = bench_models.hf_folder(shape, cache, cfg.seed)
    max_seq = cfg.prompt_len + cfg.new_tokens
    gguf = {}
    if llama:  # first: a missing converter stops the run before the exports
        weights = sorted({llama_cpp_engine.VARIANTS[v][0] for v in llama})
        with steps.step(f"llama.cpp GGUF {', '.join(weights)} (converted and quantized, cached)"):
            gguf = llama_cpp_engine.gguf_files(hf, weights, shape.vocab, src=cfg.llama_cpp_src,
                                               log=log, threads=cfg.n_threads)
    targets: list[Target] = []
    if "arx" in cfg.engines:
        with steps.step("arx export (fp32, parity vs PyTorch)"):
            fp32 = bench_models.arx_bundle(hf, cache / f"arx-{hf.name}-{max_seq}.arx",
                                           max_seq_len=max_seq, reuse=cfg.reuse_bundles)
        targets.append(Target("arx", "fp32", fp32))
        for v in cfg.variants:
            if v == "fp32":
                continue
            scheme, _, kv = v.partition("-kv")
            with steps.step(f"arx calibrate --scheme {scheme} --kv-dtype {KV_VARIANTS.get(kv, 'fp32')}"):
                q = bench_models.arx_quantized(fp32, fp32.with_name(fp32.stem + f"-{v}.arx"), scheme,
                                               reuse=cfg.reuse_bundles,
                                               kv_dtype=KV_VARIANTS.get(kv, "fp32"))
            targets.append(Target("arx", v, q))
    if "hf-eager" in cfg.engines:
        targets.append(Target("hf-eager", "fp32", hf))
    if want_og:
        for precision in ["fp32"] + (["int4"] if _int4(cfg) else []):
            with steps.step(f"onnxruntime-genai model builder -p {precision} (cached)"):
                og = bench_models.ort_genai_folder(hf, shape.vocab, precision, log)
            targets.append(Target("ort-genai", precision, og))
    for v in llama:
        w, kv = llama_cpp_engine.VARIANTS[v]
        targets.append(Target("llama.cpp", v, gguf[w], {"kv_cache": kv, "n_ctx": max_seq}))
    model = {"shape": cfg.shape, **asdict(shape), "parameters": bench_models.parameter_count(hf)}
    return targets, model


def llama_plan(cfg: BenchConfig) -> tuple[list[str], list[str]]:
    """(llama.cpp variants to run, a line for each one skipped and why)."""
    if "llama.cpp" not in cfg.engines:
        return [], []
    if not llama_cpp_engine.available():
        return [], ["llama.cpp: skipped, llama_cpp does not import (pip install 'arx[llamacpp]' "
                    "with the CMAKE_ARGS of README, Install)"]
    shape = bench_models.SHAPES[cfg.shape]
    head_dim = shape.hidden // shape.heads
    run, skipped = [], []
    for v in llama_cpp_engine.variants_for(cfg.variants):
        if llama_cpp_engine.VARIANTS[v][1] == "q8_0" and head_dim % 32:
            skipped.append(f"llama.cpp {v}: skipped, a q8_0 cache needs a head dim that is a "
                           f"multiple of 32 (shape {cfg.shape}: {head_dim})")
        else:
            run.append(v)
    return run, skipped


def _int4(cfg: BenchConfig) -> bool:
    """ort-genai's int4 model is the w4 variants' counterpart (any cache dtype)."""
    return any(v.startswith("w4") for v in cfg.variants)


def measure(cfg: BenchConfig, targets: list[Target]) -> None:
    """Warm-up rounds, then `runs` rounds in which every target runs once (interleaved)."""
    import numpy as np

    from arx.progress import bar

    rng = np.random.default_rng(cfg.seed)
    vocab = bench_models.SHAPES[cfg.shape].vocab
    prompt = rng.integers(3, vocab, cfg.prompt_len).tolist()  # 0..2: pad/bos/eos
    engines = {}
    for t in targets:
        engines[t.label] = decode_engines.ENGINES[t.engine](t.path, cfg.n_threads, **t.options)
    try:
        total = len(targets) * (cfg.warmup + cfg.runs)
        # each round starts one target later, so no engine always follows the same neighbour
        n = len(targets)
        plan = [(r, targets[(r + i) % n]) for r in range(cfg.warmup + cfg.runs) for i in range(n)]
        it = bar(plan, "timing", total=total, enabled=cfg.progress)
        for r, t in it:
            if hasattr(it, "set_postfix_str"):
                it.set_postfix_str(f"{'warm-up' if r < cfg.warmup else 'run'} {t.label}")
            timing = engines[t.label].run(prompt, cfg.new_tokens)
            if r >= cfg.warmup:
                t.ttft_s.append(timing.ttft_s)
                t.decode_tps.append(timing.decode_tokens_per_s)
                t.tokens = timing.tokens
    finally:
        for e in engines.values():
            e.close()


def ratios(results: dict[str, dict]) -> list[dict]:
    out = []
    for num, den, goal in GOALS:
        if num in results and den in results:
            r = results[num]["decode_tokens_per_s"] / results[den]["decode_tokens_per_s"]
            out.append({"numerator": num, "denominator": den, "ratio": r, "goal": goal,
                        "met": r >= goal})
    return out


def token_check(targets: list[Target]) -> dict:
    """Each target's greedy tokens vs the reference's (HF eager fp32, else arx fp32): float
    ones should be equal, llama.cpp f16 for most tokens (its f16 weights, cache and products),
    so the count of equal positions is given; quantized ones are reported with their weights
    named, as they may differ (arx w8/w4 and ort-genai int4 are left out, as before)."""
    by = {t.label: t.tokens for t in targets}
    ref_label = next((x for x in ("hf-eager fp32", "arx fp32") if x in by), None)
    out = {}
    if ref_label is None:
        return out
    ref = by[ref_label]
    for label, toks in by.items():
        variant = label.split()[-1]
        quantized = variant.startswith(QUANTIZED)
        if label == ref_label or (quantized and not label.startswith("llama.cpp")):
            continue
        first = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), None)
        out[label] = {"equal": toks == ref, "first_difference": first, "compared": len(ref),
                      "matches": sum(a == b for a, b in zip(toks, ref)), "reference": ref_label,
                      "weights": variant.split("-")[0] if quantized else None}
    return out


def machine(cfg: BenchConfig) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    versions = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
    for mod in ("torch", "transformers", "onnxruntime_genai", "llama_cpp"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)), "threads": cfg.n_threads,
            "versions": versions}


def run_benchmark(cfg: BenchConfig) -> dict:
    load_before = os.getloadavg()
    log = Path(tempfile.gettempdir()) / "arx-bench-builder.log"
    targets, model = prepare(cfg, log)
    load_start = os.getloadavg()
    t = time.perf_counter()
    measure(cfg, targets)
    results = {t_.label: t_.summary() for t_ in targets}
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "model": model, "machine": machine(cfg),
        "load_average": {"before_prepare": load_before, "before_timing": load_start,
                         "after_timing": os.getloadavg()},
        "timing_wall_s": time.perf_counter() - t,
        "results": results, "ratios": ratios(results), "tokens_vs_hf": token_check(targets),
        "skipped": llama_plan(cfg)[1],
    }


def format_table(report: dict) -> str:
    c, m = report["config"], report["model"]
    lines = [f"decode benchmark: {c['shape']} {m.get('family', 'llama')} "
             f"({m['parameters'] / 1e6:.1f}M params), CPU "
             f"({report['machine']['cpu']}), batch 1, prompt {c['prompt_len']}, "
             f"{c['new_tokens']} new tokens, {report['machine']['threads']} threads, "
             f"median of {c['runs']} runs after {c['warmup']} warm-up",
             f"{'engine':<12}{'variant':<9}{'TTFT ms':>10}{'decode tok/s':>14}{'ms/token':>10}"
             f"{'runs min-max tok/s':>21}"]
    for r in report["results"].values():
        runs = r["runs_decode_tokens_per_s"]
        lines.append(f"{r['engine']:<12}{r['variant']:<9}{r['ttft_ms']:>10.1f}"
                     f"{r['decode_tokens_per_s']:>14.2f}{r['ms_per_token']:>10.2f}"
                     f"{min(runs):>13.1f}-{max(runs):<7.1f}")
    if report["ratios"]:
        lines.append(f"{'decode tok/s ratio':<36}{'measured':>9}{'goal':>9}")
        for q in report["ratios"]:
            lines.append(f"{q['numerator'] + ' / ' + q['denominator']:<36}{q['ratio']:>8.2f}x"
                         f"{'>= ' + format(q['goal'], '.1f') + 'x':>9}  {'met' if q['met'] else 'NOT met'}")
    for label, chk in report["tokens_vs_hf"].items():
        lines.append(f"greedy tokens {label} vs {chk.get('reference', 'hf-eager fp32')}: "
                     + _verdict(chk))
    lines += report.get("skipped", [])
    la = report["load_average"]
    lines.append("load average (1/5/15 min) before timing: "
                 + " ".join(f"{x:.2f}" for x in la["before_timing"])
                 + "; after: " + " ".join(f"{x:.2f}" for x in la["after_timing"]))
    return "\n".join(lines)


def _verdict(chk: dict) -> str:
    n, first = chk["compared"], chk["first_difference"]
    if chk["equal"]:
        return f"equal ({n} tokens)"
    why = f"differs, {chk['weights']} weights" if chk["weights"] else f"differ from token {first}"
    return f"{why} ({chk['matches']}/{n} equal, first difference at {first})"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["results"].values())
    labels = [f"{r['engine']} {r['variant']}" for r in rows]
    palette = {"arx": "tab:blue", "hf-eager": "tab:gray", "llama.cpp": "tab:green"}
    colors = [palette.get(r["engine"], "tab:orange") for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 2.2))
    y = range(len(rows))
    a.barh(y, [r["decode_tokens_per_s"] for r in rows], color=colors)
    a.set(yticks=list(y), yticklabels=labels, xlabel="decode tokens/s (higher is better)",
          title="Decode throughput")
    b.barh(y, [r["ttft_ms"] for r in rows], color=colors)
    b.set(yticks=list(y), yticklabels=labels, xlabel="time to first token, ms (lower is better)",
          title=f"Time to first token (prompt {report['config']['prompt_len']})")
    for ax, key, fmt in ((a, "decode_tokens_per_s", "{:.1f}"), (b, "ttft_ms", "{:.0f}")):
        ax.invert_yaxis()
        for i, r in enumerate(rows):
            ax.text(r[key], i, " " + fmt.format(r[key]), va="center", fontsize=9)
        ax.margins(x=0.18)
    c, m = report["config"], report["model"]
    fig.suptitle(f"{m['parameters'] / 1e6:.0f}M-parameter Llama, CPU, {report['machine']['threads']} "
                 f"threads, batch 1, {c['new_tokens']} new tokens, median of {c['runs']} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="125m", choices=sorted(bench_models.SHAPES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: usable CPUs)")
    p.add_argument("--variants", default="fp32", help="comma list of fp32,w8,w4,w4-kv16,w4-kv8")
    p.add_argument("--engines", default=",".join(BenchConfig.engines))
    p.add_argument("--llama-cpp-src", default="", help="llama-cpp-python's unpacked sdist, for "
                   f"llama.cpp's converter (default: ${llama_cpp_engine.SRC_ENV})")
    p.add_argument("--cache-dir", default=BenchConfig.cache_dir)
    p.add_argument("--reuse-bundles", action="store_true", help="do not re-export the arx bundles")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    cfg = BenchConfig(shape=a.shape, prompt_len=a.prompt_len, new_tokens=a.new_tokens, runs=a.runs,
                      warmup=a.warmup, threads=a.threads, variants=split(a.variants),
                      engines=split(a.engines), cache_dir=a.cache_dir,
                      llama_cpp_src=a.llama_cpp_src,
                      reuse_bundles=a.reuse_bundles, progress=not a.quiet)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    report = run_benchmark(cfg)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
