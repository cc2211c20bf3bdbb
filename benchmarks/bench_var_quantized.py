"""Accuracy after quantization of a trained next-scale model: models/arx-var-digits, each scheme.

    python benchmarks/bench_var_quantized.py                     # table + docs/img picture
    python benchmarks/bench_var_quantized.py --schemes w8 --no-plot

Each scheme goes through `arx calibrate` at its defaults (the bundle draws its own calibration
and held-out images; --force, so a scheme over the gate is still measured, its verdict in the
row). Then what matters for a digit model: the share of generated digits that the classifier
scripts/train_var.py fitted on the real digits (train_metrics.json) reads as the class asked
for, greedy (one of each digit) and sampled at the bundle's defaults (--sampled of each digit,
seed 0), for fp32 and every scheme, and the greedy tokens' agreement with fp32. The picture
shows two of each digit (seed 0) per bundle, one row each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "arx-var-digits"
PICTURE = ROOT / "docs" / "img" / "var_digits_quantized.png"
sys.path.insert(0, str(ROOT / "scripts"))
from train_var import classify, draw_result  # noqa: E402


def draw(bundle: Path, classes: list[int], seed: int | None):
    """(pixels (B, 1, H, W), tokens per scale) at the bundle's defaults (greedy: seed None)."""
    r = draw_result(bundle, classes, seed)
    return r.pixels, r.tokens


def calibrate(scheme: str, out: Path) -> dict:
    from arx.calibration.calibrator import calibrate_bundle
    from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
    from arx.calibration.next_scale import DEFAULT_EVAL_IMAGES, DEFAULT_IMAGES

    result = calibrate_bundle(bundle=BUNDLE, output=out, options=CalibrateOptions(
        quant=QuantOptions(scheme=scheme),
        data=DataOptions(samples=DEFAULT_IMAGES, eval_samples=DEFAULT_EVAL_IMAGES),
        force=True, progress=False, plot=False))
    return result.manifest.extensions["quantization"]["accuracy"]


def measure(bundle: Path, sampled: int, classifier: dict, fp_tokens=None) -> dict:
    greedy_px, greedy_tokens = draw(bundle, list(range(10)), None)
    asked = [c for c in range(10) for _ in range(sampled)]
    sampled_px, _ = draw(bundle, asked, 0)
    row = {"greedy_read_as_asked": float(np.mean(classify(greedy_px, classifier) == np.arange(10))),
           "sampled_read_as_asked": float(np.mean(classify(sampled_px, classifier) == np.array(asked)))}
    if fp_tokens is not None:
        row["greedy_token_agreement"] = float(np.mean(np.concatenate(
            [(a == b).ravel() for a, b in zip(greedy_tokens, fp_tokens)])))
    return row, greedy_tokens


def picture(bundles: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in range(10) for _ in range(2)]
    fig, axes = plt.subplots(len(bundles), 1, figsize=(10, 0.75 * len(bundles) + 0.3))
    for ax, (name, bundle) in zip(np.atleast_1d(axes), bundles.items()):
        px = draw(bundle, classes, 0)[0][:, 0]  # (B, H, W) in [-1, 1]
        gap = np.full((px.shape[1], 1), -1.0)
        ax.imshow(np.concatenate([x for p in px for x in (p, gap)][:-1], axis=1), cmap="gray",
                  vmin=-1, vmax=1)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("models/arx-var-digits: two of each digit, seed 0, per bundle", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="w8a8,w8,w4")
    p.add_argument("--sampled", type=int, default=10, help="sampled digits of each class")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=PICTURE)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    classifier = json.loads((BUNDLE / "train_metrics.json").read_text())["classifier"]
    rows, bundles = [], {"fp32": BUNDLE}
    with tempfile.TemporaryDirectory() as tmp:
        fp_row, fp_tokens = measure(BUNDLE, args.sampled, classifier)
        rows.append({"bundle": "fp32", **fp_row})
        print(json.dumps(rows[-1]), flush=True)
        for scheme in args.schemes.split(","):
            out = Path(tmp) / f"digits-{scheme}.arx"
            acc = calibrate(scheme, out)
            row, _ = measure(out, args.sampled, classifier, fp_tokens)
            rows.append({"bundle": scheme, "gate_passed": acc["passed"],
                         "ppl_increase": acc["ppl_increase"],
                         "top1_agreement": acc["top1_agreement"], **row})
            print(json.dumps(rows[-1]), flush=True)
            bundles[scheme] = out
        if not args.no_plot:
            picture(bundles, args.out)
            print(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
