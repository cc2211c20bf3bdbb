"""Export time and peak memory at real scale: arx export vs onnxruntime-genai's model builder.

    python benchmarks/bench_export.py --shape llama-3.2-1b      # ~2.5 GB checkpoint, ~20 min
    python benchmarks/bench_export.py --shape llama-3.1-8b      # ~16 GB checkpoint, long
    python benchmarks/bench_export.py --shape llama-300m        # 291M, 582 MB: README's table
    python benchmarks/bench_export.py --shape tiny              # the smoke test's shape
    python benchmarks/bench_export.py --shape llama-3.2-1b --repeat 3   # median of 3, spread

For each shape a random bf16 checkpoint is written shard by shard (random_checkpoint.py,
never whole in memory), then every run exports it in a child process whose peak resident
memory is its ru_maxrss (read through getrusage(RUSAGE_CHILDREN) of a wrapper), each output
is deleted after it is measured, the checkpoint at the end. Free disk is checked before each
step. Runs: arx fp32 (not at 8B), arx fp16; the builder fp32 (not at 8B, -e cpu),
fp16 (-e cuda: the graph is the one a GPU runs, no GPU is needed to write it) and int4
(-e cpu); arx w4 is `arx export --quantize w4` (straight to int4, its accuracy gate on random
token ids included, as the builder has none).
With --repeat N each export runs N times: the median time, its spread (min-max) and the
largest peak. The budget column is issue 15's goal: 1.5x the larger of checkpoint and
output, + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_checkpoint as rc  # noqa: E402
from bench_models import write_word_tokenizer  # noqa: E402

GB = 1 << 30
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
SHAPES = {"tiny": TINY, "llama-300m": rc.LLAMA_300M, "llama-3.2-1b": rc.LLAMA_3_2_1B,
          "llama-3.1-8b": rc.LLAMA_3_1_8B}
BUILDER = {"fp32": "cpu", "fp16": "cuda", "int4": "cpu"}  # precision -> builder's -e


def peak_run(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(seconds, peak resident bytes) of `cmd` run as the only child of a wrapper process."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    seconds, kb = proc.stdout.split()[-2:]
    return float(seconds), int(kb) * 1024  # ru_maxrss is in kB on Linux


def runs(shape: str) -> list[tuple[str, str]]:
    big = shape == "llama-3.1-8b"  # fp32 of 8B (32 GB) is out of reach here, as the issue says
    return [("arx", p) for p in (("fp16", "w4") if big else ("fp32", "fp16", "w4"))] + \
        [("ort-genai", p) for p in (("fp16", "int4") if big else ("fp32", "fp16", "int4"))]


# rows run only when --only names them: what a choice costs, beside the default's row
# (-float-embedding: the token table kept float32, as w4/w8 wrote it before 2026-12-04)
OPTIONAL = [("arx", "w4-float-embedding"), ("arx", "w8"), ("arx", "w8-float-embedding")]
FLOAT_EMBEDDING = "-float-embedding"


def command(tool: str, precision: str, ckpt: Path, out: Path, max_seq_len: int) -> list[str]:
    if tool == "arx":
        scheme = precision.removesuffix(FLOAT_EMBEDDING)
        flags = (["--quantize", scheme] + (["--embedding", "float"] if scheme != precision else [])
                 if scheme in ("w4", "w8") else ["--dtype", precision])
        return [sys.executable, "-m", "arx", "export", str(ckpt), "-o", str(out), "-q", *flags,
                "--max-seq-len", str(max_seq_len)]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o",
            str(out), "-p", precision, "-e", BUILDER[precision], "-c", str(out) + "-cache"]


def _need_disk(folder: Path, nbytes: float, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.1:
        raise SystemExit(f"{what} needs about {nbytes / GB:.1f} GB of disk, {free / GB:.1f} GB "
                         f"free in {folder}")


def bench(shape: str, work: Path, max_seq_len: int = 2048, only: set[str] | None = None,
          repeat: int = 1) -> list[dict]:
    cfg = SHAPES[shape]
    max_seq_len = min(max_seq_len, cfg["max_position_embeddings"])
    ckpt = work / shape
    params_bytes = 2 * _params(cfg)  # bf16
    _need_disk(work, params_bytes, f"the {shape} checkpoint")
    rows = []
    try:
        # at least two shards from 300M up, as real checkpoints come: the export streams them
        shards = max(1 << 20, min(2 * GB, params_bytes // 2))
        ckpt_bytes = rc.write_llama(ckpt, cfg, shard_bytes=shards)
        write_word_tokenizer(ckpt, cfg["vocab_size"])  # the builder insists on one
        env = {**os.environ, "TQDM_DISABLE": "1"}
        for tool, precision in runs(shape) + OPTIONAL:
            wanted = f"{tool}:{precision}" in only if only else (tool, precision) not in OPTIONAL
            if not wanted:
                continue
            out = work / f"{shape}-{tool}-{precision}"
            _need_disk(work, ckpt_bytes * (2 if precision == "fp32" else 1), f"{tool} {precision}")
            row = {"shape": shape, "tool": tool, "precision": precision}
            try:
                row.update(_measure(command(tool, precision, ckpt, out, max_seq_len), env, out,
                                    ckpt_bytes, repeat))
            except RuntimeError as e:  # (an OOM kill of the builder at 8B): the row says so
                print(e, file=sys.stderr)
                row.update({"seconds": "failed", "spread_s": "-", "peak_gb": "-",
                            "output_gb": "-", "budget_gb": "-",
                            "error": str(e).splitlines()[-1][:200]})
            rows.append(row)
            print(table(rows[-1:]), file=sys.stderr, flush=True)  # each row as it comes
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def _measure(cmd: list[str], env: dict, out: Path, ckpt_bytes: int, repeat: int) -> dict:
    """The median time of `repeat` runs (the spread beside it), the largest peak, the output's
    size and issue 15's budget for it; each run's output deleted after it is measured."""
    times, peaks, size = [], [], 0
    for _ in range(repeat):
        try:
            seconds, peak = peak_run(cmd, env)
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(str(out) + "-cache", ignore_errors=True)
        times.append(seconds)
        peaks.append(peak)
    budget = 1.5 * max(ckpt_bytes, size) + GB
    spread = f"{min(times):.1f}-{max(times):.1f}" if repeat > 1 else "-"
    return {"seconds": round(statistics.median(times), 1), "spread_s": spread,
            "runs": len(times), "peak_gb": round(max(peaks) / GB, 2),
            "output_gb": round(size / GB, 2), "budget_gb": round(budget / GB, 2)}


def _params(cfg: dict) -> int:
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], \
        cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    attn = h * d * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    head = 0 if cfg.get("tie_word_embeddings") else v * h
    return layers * (attn + 3 * h * i) + v * h + head


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':<14}{'tool':<11}{'precision':<10}{'seconds':>9}{'spread s':>13}"
             f"{'peak GB':>9}{'output GB':>11}{'budget GB':>11}"]
    for r in rows:
        lines.append(f"{r['shape']:<14}{r['tool']:<11}{r['precision']:<10}{r['seconds']:>9}"
                     f"{r['spread_s']:>13}{r['peak_gb']:>9}{r['output_gb']:>11}"
                     f"{r['budget_gb']:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    p.add_argument("--work", help="folder for the checkpoints and outputs (default: a temp one)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--only", help="comma-separated TOOL:PRECISION runs (e.g. arx:w4,ort-genai:fp16)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each export: the table gives the median time and the spread")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    only = set(args.only.split(",")) if args.only else None
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.work) as work:
        rows = [r for s in args.shape for r in bench(s, Path(work), args.max_seq_len, only,
                                                     args.repeat)]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
