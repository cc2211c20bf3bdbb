"""Next-scale (VAR) speed: arx (ONNX Runtime) against the module in eager PyTorch, same weights.

    python benchmarks/bench_var.py                       # ~100M parameters, 10 scales up to 16x16
    python benchmarks/bench_var.py --shape tiny --runs 1 # the smoke run (tests/benchmarks)

A random VAR-shaped model (tests/var_model.py: AdaLN blocks, L2-normalised attention, the
multi-scale residual VQ-VAE with VAR's schedule 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 = 680 tokens
over a 4096-code, 32-channel codebook) is saved, exported with `arx export`, then both sides
draw greedy images with CFG (cfg 4, VAR's schedule: the doubled batch [cond; null]) for batch 1
and 8, the median of --runs runs each, after one warm-up run. Greedy, so both sides draw the
same tokens (checked), which keeps the comparison on the same work. Reported per engine and
batch: seconds per image, and where the time goes (each scale's step + sampling + next input,
the VQ decoder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (width, depth, heads, codebook, Cvae, patch_nums)
SHAPES = {"100m": (768, 10, 12, 4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
          "tiny": (64, 2, 4, 64, 8, (1, 2, 3, 4, 6))}


def var_model(shape: str, seed: int = 0):
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from var_model import VQVAE, TinyVAR

    width, depth, heads, codebook, cvae, pns = SHAPES[shape]
    torch.manual_seed(seed)
    vae = VQVAE(vocab=codebook, cvae=cvae, patch_nums=pns, channels=3, width=32)
    return TinyVAR(vae, num_classes=1000, depth=depth, width=width, heads=heads).eval()


def time_eager(model, batch: int, cfg: float) -> dict:
    import torch

    labels = list(range(batch))
    t = time.perf_counter()
    with torch.no_grad():
        tokens, _ = model.generate(labels, cfg=cfg)
    total = time.perf_counter() - t
    return {"seconds_per_image": total / batch, "total_s": total,
            "tokens": [x.numpy().tolist() for x in tokens]}


def time_arx(bundle: Path, batch: int, cfg: float, threads: int) -> dict:
    from arx.runtime.backend import BackendOptions
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.sampler import SamplingOptions
    from arx.runtime.var_generate import VarOptions, VarStages, generate_var, var_info

    backend = BackendOptions(intra_op_threads=threads)
    options = VarOptions(cfg, SamplingOptions(do_sample=False))
    with DecoderSession(bundle, backend) as session, \
            VarStages(bundle, session.manifest, var_info(session.manifest), backend) as stages:
        generate_var(session, stages, list(range(batch)), options)  # warm-up: graphs opened
        t = time.perf_counter()
        r = generate_var(session, stages, list(range(batch)), options)
        total = time.perf_counter() - t
    return {"seconds_per_image": total / batch, "total_s": total, "scale_step_s": r.step_s,
            "vq_decoder_s": r.vq_s, "tokens": [x.reshape(batch, -1).tolist() for x in r.tokens]}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="100m")
    p.add_argument("--batch", type=int, action="append", help="default: 1 and 8")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from arx.export.exporter import ExportOptions, export_model

    torch.set_num_threads(args.threads)
    model = var_model(args.shape)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model, Path(tmp) / "model.pt")
        export_model(source=Path(tmp) / "model.pt", output=Path(tmp) / "var.arx",
                     options=ExportOptions(progress=False))
        for batch in args.batch or [1, 8]:
            eager = [time_eager(model, batch, args.cfg) for _ in range(args.runs + 1)][1:]
            arx = [time_arx(Path(tmp) / "var.arx", batch, args.cfg, args.threads)
                   for _ in range(args.runs)]
            if eager[0]["tokens"] != arx[0]["tokens"]:
                raise SystemExit(f"batch {batch}: arx and eager PyTorch drew different tokens")
            row = {"shape": args.shape, "parameters": params, "batch": batch, "cfg": args.cfg,
                   "eager_s_per_image": statistics.median(r["seconds_per_image"] for r in eager),
                   "arx_s_per_image": statistics.median(r["seconds_per_image"] for r in arx),
                   "arx_scale_step_s": arx[0]["scale_step_s"], "arx_vq_s": arx[0]["vq_decoder_s"]}
            row["speedup"] = row["eager_s_per_image"] / row["arx_s_per_image"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
