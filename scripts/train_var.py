"""Train arx-var-digits, a VAR-shaped next-scale model, on scikit-learn's bundled 8x8 digits.

    python scripts/train_var.py --out models/arx-var-digits       # the shipped run
    python scripts/train_var.py --vq-steps 50 --ar-steps 50 --out /tmp/smoke

Needs `pip install 'arx[export,digits]'` (nothing is downloaded). Two stages, as VAR is built:
1. the multi-scale residual VQ-VAE of tests/var_model.py (conv encoder, 64 codes of 8 channels,
   scales 1, 2, 3, 4, 6 with two phi convs, conv decoder to 12x12) on the digits and their
   one-pixel shifts, bilinear to 12x12 (reconstruction + VAR's VQ loss, straight-through,
   unused codes re-seeded from encoder outputs);
2. TinyVAR (tests/var_model.py: AdaLN blocks, L2-normalised attention, level/position
   embeddings, 10% of labels dropped to the null class for CFG) teacher-forced on the token
   pyramids with the block-causal mask.
Then `arx export` into --out, train_metrics.json beside it (losses, a small classifier of 12x12
digits fitted on the real ones, and how many generated digits it reads as the class asked for)
and samples.png (two of each digit at the bundle's defaults, seed 0). Seeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]  # var_model, train_digits

from train_digits import digit_classifier, load_digits_tensor  # noqa: E402
from var_model import VQVAE, TinyVAR  # noqa: E402

SIDE = 12  # pixels; the VQ-VAE's latent is 6x6, the last scale


@dataclass(frozen=True)
class VarDigitsOptions:
    seed: int = 0
    vq_steps: int = 400  # the shipped run's (~20 min on 2 busy shared cores)
    ar_steps: int = 600
    batch: int = 48
    lr: float = 3e-3
    depth: int = 2
    null_prob: float = 0.1  # VAR's cond_drop_rate
    cfg_scale: float = 2.0  # the bundle's defaults
    top_k: int = 8
    top_p: float = 1.0
    threads: int = 2


def train_vae(x, o: VarDigitsOptions, log) -> tuple[VQVAE, dict]:
    vae = VQVAE()
    opt = torch.optim.Adam(vae.parameters(), lr=o.lr)
    for step in range(o.vq_steps):
        batch = x[torch.randint(0, len(x), (o.batch,))]
        recon, vq_loss, ids = vae(batch)
        rec = F.mse_loss(recon, batch)
        opt.zero_grad()
        (rec + vq_loss).backward()
        opt.step()
        if step % 100 == 99:
            _reseed_unused(vae, batch, ids)
            log(f"vq step {step + 1}: recon {rec.item():.4f}, vq {vq_loss.item():.4f}")
    with torch.no_grad():
        recon, _, ids = vae(x)
        used = torch.cat(ids, 1).unique().numel()
    return vae.eval(), {"vq_recon_mse": F.mse_loss(recon.clamp(-1, 1), x).item(), "codes_used": used}


@torch.no_grad()
def _reseed_unused(vae: VQVAE, batch, ids) -> None:
    """Codes no scale chose in this batch restart at random encoder outputs (dead codes)."""
    table = vae.quantize.embedding.weight
    dead = torch.ones(table.shape[0], dtype=torch.bool)
    dead[torch.cat(ids, 1).unique()] = False
    if dead.any():
        f = vae.quant_conv(vae.encoder(batch)).permute(0, 2, 3, 1).reshape(-1, table.shape[1])
        table[dead] = f[torch.randint(0, len(f), (int(dead.sum()),))] * 0.5


def train_var(vae: VQVAE, x, labels, o: VarDigitsOptions, log) -> tuple[TinyVAR, dict]:
    model = TinyVAR(vae, depth=o.depth, cfg_scale=o.cfg_scale, top_k=o.top_k, top_p=o.top_p)
    with torch.no_grad():  # the VQ-VAE is frozen: token pyramids and their inputs once
        pyramids = [torch.cat(t) for t in zip(*(vae(x[i:i + 512])[2]
                                                for i in range(0, len(x), 512)))]
        inputs = vae.quantize.ids_to_var_input(pyramids, vae.quantize.patch_nums[-1])
    params = [p for n, p in model.named_parameters() if not n.startswith("vae.")]
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, o.lr, total_steps=max(o.ar_steps, 1))
    model.train()
    vae.eval()
    for step in range(o.ar_steps):
        pick = torch.randint(0, len(x), (o.batch,))
        ids = [p[pick] for p in pyramids]
        logits = model.forward_train(labels[pick], ids, drop=o.null_prob, x_in=inputs[pick])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.cat(ids, 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 249:
            log(f"var step {step + 1}: loss {loss.item():.3f}")
    return model.eval(), {"var_loss": loss.item() if o.ar_steps else None}


def classify(pixels: np.ndarray, classifier: dict) -> np.ndarray:
    """The digit the classifier (flat pixels -> 64 ReLU -> 10) sees in each (B, 1, H, W) image."""
    (w1, b1), (w2, b2) = ([np.array(t, np.float32) for t in layer] for layer in classifier["layers"])
    return (np.maximum(pixels.reshape(len(pixels), -1) @ w1 + b1, 0.0) @ w2 + b2).argmax(1)


def draw(bundle: Path, classes: list[int], seed: int | None) -> np.ndarray:
    """(B, 1, 12, 12) pixels drawn by the bundle at its defaults (greedy when seed is None)."""
    return draw_result(bundle, classes, seed).pixels


def draw_result(bundle: Path, classes: list[int], seed: int | None):
    """generate_var's result (tokens, pixels) for `classes` at the bundle's defaults."""
    from arx.manifest import read_manifest
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.sampler import SamplingOptions
    from arx.runtime.var_generate import VarOptions, VarStages, generate_var, var_info

    m = read_manifest(bundle)
    info = var_info(m)
    sampling = SamplingOptions(do_sample=seed is not None, top_k=info.top_k, top_p=info.top_p,
                               seed=seed)
    with DecoderSession(bundle) as session, VarStages(bundle, m, info) as stages:
        return generate_var(session, stages, classes, VarOptions(info.cfg_scale, sampling))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    for f in VarDigitsOptions.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    o = VarDigitsOptions(**{k: getattr(args, k) for k in VarDigitsOptions.__dataclass_fields__})
    torch.manual_seed(o.seed)
    torch.set_num_threads(o.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    _, big, labels = load_digits_tensor()
    x = F.interpolate(big, size=(SIDE, SIDE), mode="bilinear", align_corners=False).clamp(-1, 1)
    vae, metrics = train_vae(x, o, log)
    model, var_metrics = train_var(vae, x, labels, o, log)
    metrics.update(var_metrics, train_s=round(time.time() - t0, 1), options=asdict(o),
                   torch=torch.__version__, classifier=digit_classifier(x, labels))
    from arx.export.exporter import ExportOptions, export_model
    from arx.runtime.image_output import grid, to_uint8, write_png

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model, Path(tmp) / "model.pt")
        export_model(source=Path(tmp) / "model.pt", output=args.out,
                     options=ExportOptions(overwrite=True))
    asked = [c for c in range(10) for _ in range(10)]
    read = classify(draw(args.out, asked, o.seed), metrics["classifier"])
    greedy = classify(draw(args.out, list(range(10)), None), metrics["classifier"])
    metrics["generated_read_as_asked"] = {"sampled_100": float((read == asked).mean()),
                                          "greedy_10": int((greedy == np.arange(10)).sum())}
    (args.out / "train_metrics.json").write_text(json.dumps(metrics) + "\n")
    pixels = draw(args.out, list(range(10)) * 2, o.seed)
    write_png(args.out / "samples.png", grid(to_uint8(pixels, (-1.0, 1.0)), gap=2), scale=4)
    log(f"wrote {args.out}: {json.dumps({k: v for k, v in metrics.items() if k != 'classifier'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
