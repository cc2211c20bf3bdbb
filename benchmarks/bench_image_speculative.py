"""Image-token speculation: speculative Jacobi decoding (`--speculate jacobi:W`) against plain
decoding on an image-token bundle (default: the embedded models/arx-digits).

    python benchmarks/bench_image_speculative.py --windows 2,4,8 --runs 5 --images 40

Per configuration, sampled with the bundle's CFG scale and top-k, the same seeds for every
configuration: tokens per target step, acceptance, seconds per image (median of --runs, the
spread printed), and the quality side: the share of digits the training script's classifier
reads as the class asked for (models/arx-digits only) and the total variation distance between
each token position's code histogram and plain decoding's (averaged over positions; two plain
runs with other seeds give the noise floor). Jacobi decoding is exact in distribution, so its
distance should sit at that floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(session, classes, options, window):
    from arx.runtime.image_generate import generate_images
    from arx.runtime.image_speculative import generate_images_jacobi

    t = time.perf_counter()
    result = (generate_images(session, classes, options) if window is None else
              generate_images_jacobi(session, classes, options, window))
    return result, time.perf_counter() - t


def _tv(a: np.ndarray, b: np.ndarray, vocab: int) -> float:
    """Mean over token positions of the total variation distance of two (N, T) code samples."""
    per = [0.5 * np.abs(np.bincount(a[:, k], minlength=vocab) / len(a) -
                        np.bincount(b[:, k], minlength=vocab) / len(b)).sum()
           for k in range(a.shape[1])]
    return float(np.mean(per))


def _classified(bundle: Path, manifest, info, tokens, classes) -> float | None:
    metrics = bundle / "train_metrics.json"
    if not metrics.is_file():
        return None
    from arx.runtime.image_generate import decode_pixels

    layers = json.loads(metrics.read_text())["classifier"]["layers"]
    (w1, b1), (w2, b2) = ([np.array(t, np.float32) for t in layer] for layer in layers)
    pixels = decode_pixels(bundle, info, manifest, tokens)
    hidden = np.maximum(pixels.reshape(len(pixels), -1) @ w1 + b1, 0.0)
    return float(((hidden @ w2 + b2).argmax(1) == np.array(classes)).mean())


OTHER_SEEDS = "plain, other seeds"  # plain decoding again with other seeds: the noise floor


def _measure(session, args, base, classes, window) -> tuple[np.ndarray, dict]:
    """--runs passes over `classes` with one method (None: plain, W: jacobi:W, OTHER_SEEDS)
    -> (the (N, T) codes drawn, the row of the table without the quality columns)."""
    times, grids, stats = [], [], []
    w = None if window == OTHER_SEEDS else window
    for r in range(args.runs):
        seed = (10_000 if window == OTHER_SEEDS else 0) + 1000 * r
        total = 0.0
        for start in range(0, len(classes), args.batch):
            opts = replace(base, sampling=replace(base.sampling, seed=seed + start))
            result, dt = _run(session, classes[start: start + args.batch], opts, w)
            total += dt
            grids.append(result.tokens.reshape(len(result.classes), -1))
            stats.append(getattr(result, "speculation", None))
        times.append(total / len(classes))
    spec = [s for s in stats if s is not None]
    row_steps, proposed = sum(s.row_steps for s in spec), sum(s.proposed for s in spec)
    name = "plain" if window is None else window if isinstance(window, str) else f"jacobi:{window}"
    return np.concatenate(grids), {
        "method": name, "s_per_image": statistics.median(times),
        "spread": max(times) - min(times),
        "tokens_per_step": sum(s.produced for s in spec) / row_steps if row_steps else 1.0,
        "acceptance": sum(s.accepted for s in spec) / proposed if proposed else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "arx-digits")
    p.add_argument("--windows", default="2,4,8")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--images", type=int, default=40, help="images per run (classes in turn)")
    p.add_argument("--batch", type=int, default=4, help="images per generate call")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from arx.manifest import read_manifest
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.image_generate import ImageOptions, image_info
    from arx.runtime.sampler import SamplingOptions

    manifest = read_manifest(args.bundle)
    info = image_info(manifest)
    base = ImageOptions(cfg_scale=info.cfg_scale, sampling=SamplingOptions(
        do_sample=True, top_k=info.top_k, temperature=info.temperature, seed=0))
    configs = [None] + [int(w) for w in args.windows.split(",")]
    classes = [i % info.num_classes for i in range(args.images)]
    with DecoderSession(args.bundle, manifest=manifest) as session:
        _run(session, classes[: args.batch], base, None)  # warm-up
        samples, rows = {}, []
        for window in configs + [OTHER_SEEDS]:
            tokens, row = _measure(session, args, base, classes, window)
            row["classified"] = _classified(args.bundle, manifest, info, tokens,
                                            classes * args.runs)
            samples[window] = tokens
            rows.append(row)
        for row, window in zip(rows, configs + [OTHER_SEEDS]):
            row["tv_vs_plain"] = _tv(samples[window], samples[None], manifest.vocab_size)
    plain = rows[0]["s_per_image"]
    print(f"{'method':20s} {'ms/image':>9s} {'spread':>7s} {'vs plain':>8s} {'tok/step':>8s} "
          f"{'accept':>7s} {'classified':>10s} {'TV':>6s}")
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
        cls = "" if r["classified"] is None else f"{r['classified']:.0%}"
        print(f"{r['method']:20s} {r['s_per_image'] * 1e3:9.1f} {r['spread'] * 1e3:7.1f} "
              f"{plain / r['s_per_image']:7.2f}x {r['tokens_per_step']:8.2f} {acc:>7s} "
              f"{cls:>10s} {r['tv_vs_plain']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
