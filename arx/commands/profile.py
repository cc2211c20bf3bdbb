"""arx profile BUNDLE [--compare OTHER] --prompt-len 128,512 --gen-len 128 --batch 1,4 --runs 5"""

from __future__ import annotations

import json

from arx.errors import ArxError


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure latency, throughput, memory and where the time goes")
    p.add_argument("bundle")
    p.add_argument("--prompt-len", default="128", help="comma-separated prompt lengths (default 128)")
    p.add_argument("--gen-len", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per shape; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per shape first (default 1)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--compare", metavar="OTHER", help="a second bundle, profiled the same way, side by side")
    p.add_argument("--engine", metavar="TARGET", help="time the TensorRT engine `arx build --target "
                   "TARGET` made (needs TensorRT and a GPU) instead of the ONNX graph")
    p.add_argument("--draft", metavar="BUNDLE", help="also time speculative decoding with this "
                   "draft bundle (same tokenizer): acceptance, tokens per target step, speed-up")
    p.add_argument("--lookup", type=int, metavar="N", help="also time speculative decoding with "
                   "prompt lookup (n-grams up to N); the profile's prompts are random ids")
    p.add_argument("--speculate", metavar="K|auto", help="tokens proposed per step (default auto)")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op breakdown (a traced run)")
    p.add_argument("--no-roofline", action="store_true", help="skip the bandwidth measurement")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plot", metavar="FILE", help="write latency vs prompt length and batch as PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ArxError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ArxError(f"{flag} takes positive integers, got {text!r}")
    return values


def _options(args):
    from arx.runtime.profiler import ProfileOptions

    return ProfileOptions(prompt_lens=_ints("--prompt-len", args.prompt_len), gen_len=args.gen_len,
                          batches=_ints("--batch", args.batch), runs=args.runs, warmup=args.warmup,
                          device=args.device, threads=args.threads, op_breakdown=not args.no_ops,
                          roofline=not args.no_roofline and not args.engine, engine=args.engine,
                          draft=args.draft, lookup=args.lookup, speculate=args.speculate)


def run(args) -> int:
    from arx import needs
    from arx.manifest import read_manifest

    _check_speculation(args)  # flags that contradict each other, first
    needs.check("profile", args)  # --plot, --engine: before minutes of timing
    opts = _options(args)  # validates before anything is loaded
    if read_manifest(args.bundle).pipeline.kind == "next-scale":
        return _profile_var(args, opts)
    bundles = [args.bundle] + ([args.compare] if args.compare else [])
    bundles += [args.draft] if args.draft else []  # its context must hold the same shapes
    for b in bundles:  # fail on a bad second bundle before minutes of timing the first
        from pathlib import Path

        opts.check_context(read_manifest(b), Path(b))
    report = profile(bundles[: 1 + bool(args.compare)], opts, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        _write(args.json, lambda f: f.write(json.dumps(report, indent=2) + "\n"))
    if args.plot:
        plot(report, args.plot)
    return 0


def _check_speculation(args) -> None:
    from arx.runtime.speculative import from_flags

    if from_flags(args.draft, args.lookup, args.speculate) and args.engine:
        raise ArxError("arx profile --engine does not time speculation yet; drop --draft/--lookup "
                       "or --engine")


def _profile_var(args, opts) -> int:
    """A next-scale (VAR) bundle: each scale's step time and images/s per --batch."""
    from arx.runtime.backend import BackendOptions
    from arx.runtime.var_profile import format_var_report, profile_var

    given = [f for f, v in (("--compare", args.compare), ("--engine", args.engine), ("--draft",
             args.draft), ("--lookup", args.lookup), ("--plot", args.plot)) if v is not None]
    if given:
        raise ArxError(f"{given[0]} does not apply to a next-scale bundle yet; arx profile times "
                       f"its scales on ONNX Runtime (--batch, --runs, --warmup, --threads, --json)")
    report = profile_var(args.bundle, opts.batches, opts.runs, opts.warmup,
                         BackendOptions(device=opts.device, intra_op_threads=opts.threads))
    print(format_var_report(report))
    if args.json:
        _write(args.json, lambda f: f.write(json.dumps(report, indent=2) + "\n"))
    return 0


def _write(path: str, fn) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            fn(f)
    except OSError as e:
        raise ArxError(f"cannot write {path} ({e.strerror}); choose a writable path") from e


def profile(bundles: list[str], opts, progress: bool = True) -> dict:
    """Profile each bundle with the same options; the report (JSON-able) for all of them."""
    import os
    import platform

    import onnxruntime

    from arx.progress import bar
    from arx.runtime.profiler import profile_bundle, progress_total
    from arx.runtime.roofline import memory_bandwidth

    bw = memory_bandwidth(opts.threads) if opts.roofline else None
    it = iter(bar(range(progress_total(opts) * len(bundles)), "profiling", enabled=progress))
    tick = lambda: next(it, None)  # noqa: E731
    profiles = [profile_bundle(b, opts, bandwidth=bw and bw["bytes_per_s"], tick=tick).to_json()
                for b in bundles]
    next(it, None)  # let a tqdm bar close
    return {
        "options": {"prompt_lens": list(opts.prompt_lens), "gen_len": opts.gen_len,
                    "batches": list(opts.batches), "runs": opts.runs, "warmup": opts.warmup,
                    "device": opts.device, "threads": opts.threads, "draft": opts.draft,
                    "lookup": opts.lookup, "speculate": opts.speculate},
        "machine": {"cpu": _cpu_name(platform), "cpus_usable": len(os.sched_getaffinity(0)),
                    "load_average": list(os.getloadavg()), "onnxruntime": onnxruntime.__version__,
                    "memory_bandwidth": bw},
        "peak_rss_note": "peak resident set size of the whole arx process (weights, ORT arena, "
                         "KV cache, Python) while timing that shape: VmHWM, reset per shape",
        "bundles": profiles,
        "compare": _ratios(profiles) if len(profiles) == 2 else None,
    }


def _cpu_name(platform) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratios(profiles: list[dict]) -> list[dict]:
    """other / base for each shape: < 1 is faster for latencies, > 1 for tokens/s."""
    a, b = ({(r["prompt_len"], r["batch"]): r for r in p["results"]} for p in profiles)
    return [{"prompt_len": k[0], "batch": k[1],
             "ttft": b[k]["ttft_ms"] / a[k]["ttft_ms"],
             "decode_p50": b[k]["decode_ms"]["p50"] / a[k]["decode_ms"]["p50"],
             "tokens_per_s": b[k]["tokens_per_s"] / a[k]["tokens_per_s"]} for k in a if k in b]


# --- text report ------------------------------------------------------------------------------

def format_report(report: dict) -> str:
    o, m = report["options"], report["machine"]
    bw = m["memory_bandwidth"]
    lines = [f"arx profile: {o['gen_len']} generated tokens, median of {o['runs']} runs after "
             f"{o['warmup']} warm-up, device {report['bundles'][0]['device']}, {m['cpu']} "
             f"({m['cpus_usable']} CPUs, load {m['load_average'][0]:.2f})"]
    if bw:
        lines.append(f"memory bandwidth: read {bw['bytes_per_s'] / 1e9:.1f} GB/s (median "
                     f"{bw['read_median_bytes_per_s'] / 1e9:.1f}), copy {bw['copy_bytes_per_s'] / 1e9:.1f}"
                     f" GB/s ({bw['method']}, {bw['threads']} threads); the roofline uses the best read")
    for p in report["bundles"]:
        lines += ["", _bundle_header(p), _TABLE_HEAD]
        lines += [_row(r) for r in p["results"]]
        lines += _details(p)
    if report.get("compare"):
        names = [p["bundle"] for p in report["bundles"]]
        lines += ["", f"compare: {names[1]} / {names[0]} (latency < 1 and tokens/s > 1 mean "
                      f"{names[1]} is faster)",
                  f"{'prompt':>7}{'batch':>6}{'TTFT':>9}{'decode p50':>12}{'tokens/s':>10}"]
        for c in report["compare"]:
            lines.append(f"{c['prompt_len']:>7}{c['batch']:>6}{c['ttft']:>8.2f}x"
                         f"{c['decode_p50']:>11.2f}x{c['tokens_per_s']:>9.2f}x")
    lines += ["", "peak RSS: " + report["peak_rss_note"]]
    return "\n".join(lines)


_TABLE_HEAD = (f"{'prompt':>7}{'batch':>6}{'TTFT ms':>10}{'decode ms/step p50':>20}{'p90':>8}"
               f"{'p99':>8}{'tokens/s':>10}{'peak RSS MB':>13}{'roofline':>10}")


def _bundle_header(p: dict) -> str:
    m = p["model"]
    params = f", {m['parameters'] / 1e6:.1f}M params" if m.get("parameters") else ""
    return f"{p['bundle']}: {m['family']}{params}, {m['scheme']}, {m['layers']} layers"


def _row(r: dict) -> str:
    d = r["decode_ms"]
    roof = f"{r['roofline']['percent_of_roofline']:.0f}%" if r.get("roofline") else "-"
    return (f"{r['prompt_len']:>7}{r['batch']:>6}{r['ttft_ms']:>10.1f}{d['p50']:>20.2f}{d['p90']:>8.2f}"
            f"{d['p99']:>8.2f}{r['tokens_per_s']:>10.1f}{r['peak_rss_mb']:>13.0f}{roof:>10}")


def _details(p: dict) -> list[str]:
    out = []
    for r in p["results"]:
        at = f"prompt {r['prompt_len']}, batch {r['batch']}"
        for phase in ("prefill", "decode"):
            ops = r.get("op_breakdown", {}).get(phase) or []
            if ops:
                top = ", ".join(f"{o['op_type']} {100 * o['share']:.0f}%" for o in ops[:6])
                out.append(f"  where time goes ({phase}, {at}): {top}")
        spec = r.get("speculation")
        if spec:
            out.append(f"  speculation ({at}, {spec['method']}): {spec['acceptance_rate']:.0%} "
                       f"of proposals kept, {spec['tokens_per_target_step']:.2f} tokens per "
                       f"target step, {spec['tokens_per_s']:.1f} tokens/s = "
                       f"{spec['speedup']:.2f}x plain, TTFT {spec['ttft_ms']:.1f} ms")
        roof = r.get("roofline")
        if roof:
            out.append(f"  roofline ({at}): a decode step reads {roof['weight_mb']:.1f} MB weights + "
                       f"{roof['kv_mb']:.1f} MB KV (mean length {roof['mean_kv_length']:.0f}); at "
                       f"{roof['bandwidth_gb_s']:.1f} GB/s that is >= {roof['bound_ms']:.2f} ms; "
                       f"measured p50 {roof['measured_ms']:.2f} ms = "
                       f"{roof['percent_of_roofline']:.0f}% of roofline")
    return out


# --- plot -------------------------------------------------------------------------------------

def plot(report: dict, path: str) -> None:
    from arx.errors import require

    matplotlib = require("matplotlib", "plot", "arx profile --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_d) = plt.subplots(1, 2, figsize=(12, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    multi = len(report["bundles"]) > 1
    o = report["options"]
    # colour: batch; line style and marker: bundle; dotted: the memory-bandwidth bound
    for s, p in enumerate(report["bundles"]):
        name = p["bundle"].rstrip("/").split("/")[-1]
        for c, batch in enumerate(o["batches"]):
            rows = sorted((r for r in p["results"] if r["batch"] == batch), key=lambda r: r["prompt_len"])
            x = [r["prompt_len"] for r in rows]
            label = f"{name}, batch {batch}" if multi else f"batch {batch}"
            kw = dict(color=colors[c % len(colors)], linestyle=("-", "--")[s % 2], marker="os"[s % 2])
            ax_t.plot(x, [r["ttft_ms"] for r in rows], **kw)
            p50 = [r["decode_ms"]["p50"] for r in rows]
            ax_d.plot(x, p50, label=label, **kw)
            ax_d.fill_between(x, p50, [r["decode_ms"]["p90"] for r in rows], color=kw["color"], alpha=0.15)
            if all(r.get("roofline") for r in rows):
                ax_d.plot(x, [r["roofline"]["bound_ms"] for r in rows], color=kw["color"],
                          linestyle=(":", "-.")[s % 2], linewidth=1.2,
                          label=f"{label}: memory-bandwidth bound")
    ax_t.set(title="Time to first token (prefill + first token)", xlabel="prompt length (tokens)",
             ylabel="time to first token (ms)")
    ax_d.set(title="Decode step latency (line: p50, band: p50 to p90)", xlabel="prompt length (tokens)",
             ylabel="ms per decode step (one token per sequence)")
    for ax in (ax_t, ax_d):
        ax.set_xticks(sorted(set(o["prompt_lens"])))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = ax_d.get_legend_handles_labels()
    ncol = min(len(labels), 2 if multi else 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    names = " vs ".join(p["bundle"].rstrip("/").split("/")[-1] for p in report["bundles"])
    fig.suptitle(f"arx profile of {names}: {o['gen_len']} generated tokens, median of {o['runs']} "
                 f"runs, {report['bundles'][0]['device']}")
    rows_of_legend = -(-len(labels) // ncol)
    fig.tight_layout(rect=(0, 0.03 + 0.035 * rows_of_legend, 1, 1))
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise ArxError(f"cannot write {path} ({e.strerror}); choose a writable path") from e
    finally:
        plt.close(fig)
