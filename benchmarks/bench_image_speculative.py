"""Image-token speculation: speculative Jacobi decoding (`--speculate jacobi:W`) against plain
decoding on an image-token bundle (default: the embedded models/arx-digits).

    python benchmarks/bench_image_speculative.py --windows 2,4,8 --runs 5 --images 40
    python benchmarks/bench_image_speculative.py --windows 8 --relax 8,0.1:8,0.3:16,0.6

`--relax` adds rows of Jacobi decoding at the largest window with LANTERN's relaxed acceptance
(runtime/relaxed_acceptance.py: K nearest codes, DELTA of probability moved), whose quality
cost is the point of the quality columns. Per configuration, sampled with the bundle's CFG scale and top-k, the same seeds for every
configuration: tokens per target step, acceptance, seconds per image (median of --runs, the
spread printed), and the quality side: the share of digits the training script's classifier
reads as the class asked for (models/arx-digits only) and the total variation distance between
each token position's code histogram and plain decoding's (averaged over positions; two plain
runs with other seeds give the noise floor). Jacobi decoding is exact in distribution, so its
distance should sit at that floor; relaxed rows may rise above it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    name: str
    window: int | None = None  # None: plain decoding
    relax: tuple[int, float] | None = None  # LANTERN's (K, DELTA)
    seed_base: int = 0  # 10_000: plain decoding with other seeds, the noise floor


def configs(windows: str, relax: str | None) -> list[Config]:
    out = [Config("plain")] + [Config(f"jacobi:{w}", int(w)) for w in windows.split(",")]
    widest = max(int(w) for w in windows.split(","))
    for pair in (relax.split(":") if relax else []):
        k, delta = pair.split(",")
        out.append(Config(f"jacobi:{widest} relax {k},{delta}", widest, (int(k), float(delta))))
    return out + [Config("plain, other seeds", seed_base=10_000)]


def _run(session, classes, options, config: Config, relaxations: dict):
    from arx.runtime.image_generate import generate_images
    from arx.runtime.image_speculative import generate_images_jacobi

    t = time.perf_counter()
    result = (generate_images(session, classes, options) if config.window is None else
              generate_images_jacobi(session, classes, options, config.window,
                                     relaxations.get(config.relax)))
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


def _measure(session, args, base, classes, config: Config, relaxations: dict):
    """--runs passes over `classes` with one configuration -> (the (N, T) codes drawn, the row
    of the table without the quality columns)."""
    times, grids, stats = [], [], []
    for r in range(args.runs):
        seed = config.seed_base + 1000 * r
        total = 0.0
        for start in range(0, len(classes), args.batch):
            opts = replace(base, sampling=replace(base.sampling, seed=seed + start))
            result, dt = _run(session, classes[start: start + args.batch], opts, config,
                              relaxations)
            total += dt
            grids.append(result.tokens.reshape(len(result.classes), -1))
            stats.append(getattr(result, "speculation", None))
        times.append(total / len(classes))
    spec = [s for s in stats if s is not None]
    row_steps, proposed = sum(s.row_steps for s in spec), sum(s.proposed for s in spec)
    return np.concatenate(grids), {
        "method": config.name, "relax": config.relax, "s_per_image": statistics.median(times),
        "spread": max(times) - min(times),
        "tokens_per_step": sum(s.produced for s in spec) / row_steps if row_steps else 1.0,
        "acceptance": sum(s.accepted for s in spec) / proposed if proposed else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "arx-digits")
    p.add_argument("--windows", default="2,4,8")
    p.add_argument("--relax", metavar="K,DELTA[:K,DELTA...]",
                   help="relaxed-acceptance rows at the widest window")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--images", type=int, default=40, help="images per run (classes in turn)")
    p.add_argument("--batch", type=int, default=4, help="images per generate call")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from arx.manifest import read_manifest
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.image_generate import ImageOptions, image_info
    from arx.runtime.relaxed_acceptance import relaxation_for
    from arx.runtime.sampler import SamplingOptions

    manifest = read_manifest(args.bundle)
    info = image_info(manifest)
    base = ImageOptions(cfg_scale=info.cfg_scale, sampling=SamplingOptions(
        do_sample=True, top_k=info.top_k, temperature=info.temperature, seed=0))
    todo = configs(args.windows, args.relax)
    relaxations = {c.relax: relaxation_for(args.bundle, manifest, info, *c.relax)
                   for c in todo if c.relax is not None}
    classes = [i % info.num_classes for i in range(args.images)]
    with DecoderSession(args.bundle, manifest=manifest) as session:
        _run(session, classes[: args.batch], base, todo[0], relaxations)  # warm-up
        samples, rows = [], []
        for config in todo:
            tokens, row = _measure(session, args, base, classes, config, relaxations)
            row["classified"] = _classified(args.bundle, manifest, info, tokens,
                                            classes * args.runs)
            samples.append(tokens)
            rows.append(row)
        for row, tokens in zip(rows, samples):
            row["tv_vs_plain"] = _tv(tokens, samples[0], manifest.vocab_size)
    plain = rows[0]["s_per_image"]
    print(f"{'method':28s} {'ms/image':>9s} {'spread':>7s} {'vs plain':>8s} {'tok/step':>8s} "
          f"{'accept':>7s} {'classified':>10s} {'TV':>6s}")
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
        cls = "" if r["classified"] is None else f"{r['classified']:.0%}"
        print(f"{r['method']:28s} {r['s_per_image'] * 1e3:9.1f} {r['spread'] * 1e3:7.1f} "
              f"{plain / r['s_per_image']:7.2f}x {r['tokens_per_step']:8.2f} {acc:>7s} "
              f"{cls:>10s} {r['tv_vs_plain']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
