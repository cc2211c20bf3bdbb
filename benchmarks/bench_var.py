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

The quantized columns (--scheme, default w8a8; --no-quantized: none): the exported bundle through
`arx calibrate` (--calib-images images it draws itself for the ranges, half as many held out;
--force, as random weights may miss the gate), timed the same way: seconds per image, speedup over
eager PyTorch (fp32), the share of its greedy tokens equal to the fp32 bundle's (not required:
quantized logits may pick another argmax), and the gate's perplexity increase and top-1 agreement.

Beside it, the raster row: a class-conditional image-token model (export/image_modules.py, the
protocol of "Image-token generation": LlamaGen c2i, one token per step) of about the same size
(15 blocks of width 768 = 113M against VAR's 112M; tiny: 2 of width 64) and the same grid and
codebook (16x16 = 256 raster steps, 4096 codes), random weights, exported and run by arx on ONNX
Runtime with the same CFG and greedy selection: seconds per image, arx next-scale vs arx raster.
Its VQ decoder is the image protocol's small one, not VAR's, so its share is reported apart.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_bench_args import calibrated, parse_image_bench, scheme_flags, schemes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (width, depth, heads, codebook, Cvae, patch_nums)
SHAPES = {"100m": (768, 10, 12, 4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
          "tiny": (64, 2, 4, 64, 8, (1, 2, 3, 4, 6))}
RASTER_LAYERS = {"100m": 15, "tiny": 2}  # a raster model of VAR's size at the same width


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


def raster_model(shape: str, seed: int = 0):
    """The class-conditional raster model of the same width, grid (VAR's last scale) and
    codebook; full multi-head attention, as VAR's."""
    import torch

    from arx.export.image_modules import ClassToImageDecoder, VQDecoder

    width, _, heads, codebook, _, pns = SHAPES[shape]
    torch.manual_seed(seed)
    grid = pns[-1]
    return ClassToImageDecoder(num_classes=1000, codebook=codebook, grid=grid, dim=width,
                               heads=heads, kv_heads=heads, layers=RASTER_LAYERS[shape],
                               vq=VQDecoder(codebook, grid, upsamples=1)).eval()


def time_raster(bundle: Path, batch: int, cfg: float, threads: int) -> dict:
    """arx's image-token loop (one token per step over [cond; null]) and its VQ decoder."""
    from arx.runtime.backend import BackendOptions
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.image_generate import ImageOptions, decode_pixels, generate_images, image_info
    from arx.runtime.sampler import SamplingOptions

    backend = BackendOptions(intra_op_threads=threads)
    options = ImageOptions(cfg_scale=cfg, sampling=SamplingOptions(do_sample=False))
    with DecoderSession(bundle, backend) as session:
        info = image_info(session.manifest, bundle)
        generate_images(session, list(range(batch)), options)  # warm-up: graphs opened
        r = generate_images(session, list(range(batch)), options)
        t = time.perf_counter()
        decode_pixels(bundle, info, session.manifest, r.tokens, backend)
        vq = time.perf_counter() - t
    return {"seconds_per_image": (r.tokens_s + vq) / batch, "vq_decoder_s": vq,
            "steps": int(r.tokens[0].size)}  # tokens (B, g, g)


def _export(model, folder: Path, name: str) -> Path:
    import torch

    from arx.export.exporter import ExportOptions, export_model

    torch.save(model, folder / f"{name}.pt")
    export_model(source=folder / f"{name}.pt", output=folder / f"{name}.arx",
                 options=ExportOptions(progress=False))
    return folder / f"{name}.arx"


def parse(argv):
    return parse_image_bench(argv, __doc__.splitlines()[0], SHAPES, batches="1 and 8",
                             runs=3, cfg=4.0, extra=scheme_flags("w8a8", "images"))


def _calibrate(bundle: Path, scheme: str, images: int) -> tuple[Path, dict]:
    """The scheme's bundle, calibrated on images it draws itself (half as many held out)."""
    from arx.calibration.options import DataOptions

    return calibrated(bundle, scheme, DataOptions(samples=images,
                                                  eval_samples=max(2, images // 2)))


def _agreement(a: list, b: list) -> float:
    """Share of equal tokens between two runs' per-scale token lists."""
    pairs = [(x, y) for sa, sb in zip(a, b) for ra, rb in zip(sa, sb) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def _quantized_columns(row: dict, variants: dict, batch: int, args, fp_tokens: list) -> None:
    for scheme, (qbundle, acc) in variants.items():
        runs = [time_arx(qbundle, batch, args.cfg, args.threads) for _ in range(args.runs)]
        sec = statistics.median(r["seconds_per_image"] for r in runs)
        row.update({f"arx_{scheme}_s_per_image": sec,
                    f"speedup_{scheme}": row["eager_s_per_image"] / sec,
                    f"{scheme}_greedy_token_agreement": _agreement(fp_tokens, runs[0]["tokens"]),
                    f"{scheme}_ppl_increase": acc["ppl_increase"],
                    f"{scheme}_top1_agreement": acc["top1_agreement"]})


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    model, raster = var_model(args.shape), raster_model(args.shape)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
    raster_params = sum(p.numel() for n, p in raster.named_parameters() if not n.startswith("vq."))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle, raster_bundle = _export(model, Path(tmp), "var"), _export(raster, Path(tmp), "raster")
        variants = {sc: _calibrate(bundle, sc, args.calib_samples)
                    for sc in schemes(args, "w8a8")}
        for batch in args.batch or [1, 8]:
            eager = [time_eager(model, batch, args.cfg) for _ in range(args.runs + 1)][1:]
            arx = [time_arx(bundle, batch, args.cfg, args.threads) for _ in range(args.runs)]
            ras = [time_raster(raster_bundle, batch, args.cfg, args.threads)
                   for _ in range(args.runs)]
            if eager[0]["tokens"] != arx[0]["tokens"]:
                raise SystemExit(f"batch {batch}: arx and eager PyTorch drew different tokens")
            row = {"shape": args.shape, "parameters": params, "batch": batch, "cfg": args.cfg,
                   "eager_s_per_image": statistics.median(r["seconds_per_image"] for r in eager),
                   "arx_s_per_image": statistics.median(r["seconds_per_image"] for r in arx),
                   "arx_scale_step_s": arx[0]["scale_step_s"], "arx_vq_s": arx[0]["vq_decoder_s"]}
            row["speedup"] = row["eager_s_per_image"] / row["arx_s_per_image"]
            row.update(raster_parameters=raster_params, raster_steps=ras[0]["steps"],
                       raster_s_per_image=statistics.median(r["seconds_per_image"] for r in ras),
                       raster_vq_s=ras[0]["vq_decoder_s"])
            row["vs_raster"] = row["raster_s_per_image"] / row["arx_s_per_image"]
            _quantized_columns(row, variants, batch, args, arx[0]["tokens"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
