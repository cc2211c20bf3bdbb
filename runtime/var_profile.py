"""arx profile on a next-scale (VAR) bundle: each scale's step time and images/s per batch.

A run is one generate_var of `batch` images (classes 0, 1, ...) at the bundle's guidance,
greedy (the sampler's share is then the argmax over the mixed logits; top-k/top-p add a sort
per position), after `warmup` untimed runs that open every graph. Reported per batch: the
median over runs of each scale's time (its block step over the doubled batch, the selection of
every position, the next-input stage) and of the VQ decoder, seconds per image and images/s.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from arx.runtime.backend import BackendOptions
from arx.runtime.sampler import SamplingOptions


def profile_var(bundle: str | Path, batches: tuple[int, ...], runs: int, warmup: int,
                backend: BackendOptions = BackendOptions()) -> dict:
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.var_generate import VarOptions, VarStages, generate_var, var_info

    rows = []
    with DecoderSession(bundle, backend) as session:
        info = var_info(session.manifest, bundle)
        options = VarOptions(info.cfg_scale, SamplingOptions(do_sample=False))
        with VarStages(bundle, session.manifest, info, backend) as stages:
            for batch in batches:
                classes = [c % info.num_classes for c in range(batch)]
                results = [generate_var(session, stages, classes, options)
                           for _ in range(warmup + runs)][warmup:]
                steps = [statistics.median(r.step_s[k] for r in results)
                         for k in range(len(info.patch_nums))]
                per_image = statistics.median(r.seconds_per_image for r in results)
                rows.append({"batch": batch, "cfg": info.cfg_scale, "scale_step_s": steps,
                             "vq_decoder_s": statistics.median(r.vq_s for r in results),
                             "seconds_per_image": per_image, "images_per_s": 1.0 / per_image})
    return {"bundle": str(bundle), "kind": "next-scale", "patch_nums": list(info.patch_nums),
            "runs": runs, "rows": rows}


def format_var_report(report: dict) -> str:
    pns = report["patch_nums"]
    head = "batch  " + "  ".join(f"{p}x{p}".rjust(7) for p in pns) + "       vq  s/image  images/s"
    lines = [f"{report['bundle']}: next-scale, {len(pns)} scales, step ms per scale "
             f"(median of {report['runs']}, CFG {report['rows'][0]['cfg']:g})", head]
    for r in report["rows"]:
        steps = "  ".join(f"{s * 1e3:7.1f}" for s in r["scale_step_s"])
        lines.append(f"{r['batch']:5d}  {steps}  {r['vq_decoder_s'] * 1e3:7.1f}  "
                     f"{r['seconds_per_image']:7.3f}  {r['images_per_s']:8.2f}")
    return "\n".join(lines)
