"""Train arx-digits, the embedded image-token default, on scikit-learn's bundled 8x8 digits.

    python scripts/train_digits.py --out models/arx-digits            # the shipped run (~3 min on 2 shared cores)
    python scripts/train_digits.py --vq-steps 50 --ar-steps 50 --out /tmp/smoke

Needs `pip install 'arx[export,digits]'` (scikit-learn ships the 1797 digits; nothing is
downloaded). Two stages, as image-token models are built:
1. a VQ tokenizer: 8x8 digit -> conv encoder -> 4x4 grid of 8-d vectors -> nearest of 64
   L2-normalised codebook entries (cosine, LlamaGen's choice) -> the VQ decoder of
   arx.export.image_modules (post_quant_conv, two nearest 2x upsamples) -> 16x16 pixels,
   trained against the bilinear 16x16 digit (straight-through gradients, commitment loss, dead
   codes re-seeded from encoder outputs);
2. the LlamaGen-shaped class-to-image decoder (arx.export.image_modules.ClassToImageDecoder:
   class token, 2D RoPE, 15% of labels dropped to the null class for CFG) on the token grids.
Then `arx export` of the pair into --out (a bundle: decoder, vq_decoder, image pipeline) and
train_metrics.json beside it, with a small classifier of 16x16 digits fitted on the real
ones, which the tests use to check that a generated digit is the one asked for. Seeded: the same torch version and thread count reproduce the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arx.export.image_modules import ClassToImageDecoder, VQDecoder

CODEBOOK, GRID, EMBED, SIDE = 64, 4, 8, 16  # 4x4 tokens of 64 codes -> 16x16 gray pixels


@dataclass(frozen=True)
class DigitsOptions:
    seed: int = 0
    vq_steps: int = 600
    ar_steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    null_prob: float = 0.15  # labels dropped to the null class (classifier-free guidance)
    cfg_scale: float = 3.0  # the bundle's default guidance
    top_k: int = 8  # the bundle's default sampling: the 8 likeliest of 64 codes
    threads: int = 2


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N,1,8,8) in [-1,1], targets (N,1,16,16) bilinear in [-1,1], labels (N,)),
    the digits and their one-pixel shifts."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("scripts/train_digits.py needs scikit-learn (its bundled digits): "
                 "pip install 'arx[digits]'")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    labels = torch.tensor(d.target, dtype=torch.long)
    # one-pixel shifts: 9x the 1797 digits, so the models learn strokes rather than memorise
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    x = torch.cat([pad[..., i:i + 8, j:j + 8] for i in range(3) for j in range(3)])
    big = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return x, big.clamp(-1, 1), labels.repeat(9)


class Encoder(nn.Module):
    """(B,1,8,8) -> (B,E,4,4): the tokenizer's half that the bundle does not need."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, EMBED, 1))

    def forward(self, x):
        return self.net(x)


def quantize(z: torch.Tensor, codebook: torch.Tensor):
    """z (B,E,g,g) -> (straight-through normalised codes, ids (B, g*g), commitment + codebook
    loss), by cosine similarity to the L2-normalised codebook."""
    b = z.shape[0]
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, EMBED), dim=-1)  # (B*g*g, E)
    codes = F.normalize(codebook, dim=-1)
    ids = (flat @ codes.T).argmax(-1)
    q = codes[ids]
    loss = F.mse_loss(q, flat.detach()) + 0.25 * F.mse_loss(flat, q.detach())
    st = flat + (q - flat).detach()
    return st.reshape(b, GRID, GRID, EMBED).permute(0, 3, 1, 2), ids.reshape(b, -1), loss, flat


def train_vq(x, target, o: DigitsOptions, log) -> tuple[VQDecoder, torch.Tensor, dict]:
    enc, vq = Encoder(), VQDecoder(CODEBOOK, GRID, embed_dim=EMBED, width=32, upsamples=2,
                                   channels=1)
    opt = torch.optim.Adam([*enc.parameters(), *vq.parameters()], lr=o.lr)
    gen = torch.Generator().manual_seed(o.seed)
    for step in range(o.vq_steps):
        idx = torch.randint(0, len(x), (o.batch,), generator=gen)
        zq, ids, q_loss, flat = quantize(enc(x[idx]), vq.embedding.weight)
        recon = vq.decoder(vq.post_quant_conv(zq))
        loss = F.mse_loss(recon, target[idx]) + q_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:  # re-seed codes no batch used from this batch's encoder outputs
            with torch.no_grad():
                dead = torch.ones(CODEBOOK, dtype=torch.bool)
                dead[ids.unique()] = False
                pick = torch.randint(0, len(flat), (int(dead.sum()),), generator=gen)
                vq.embedding.weight[dead] = flat[pick].detach()
            log(f"vq step {step}: loss {loss.item():.4f}, {int((~dead).sum())} codes used")
    with torch.no_grad():
        _, ids, _, _ = quantize(enc(x), vq.embedding.weight)
        mse = F.mse_loss(vq(ids), target).item()
    return vq.eval(), ids, {"vq_recon_mse": mse, "codes_used": int(ids.unique().numel())}


def train_ar(ids, labels, vq, o: DigitsOptions, log) -> tuple[ClassToImageDecoder, dict]:
    model = ClassToImageDecoder(num_classes=10, codebook=CODEBOOK, grid=GRID, dim=64, heads=4,
                                kv_heads=2, layers=3, vq=vq, cfg_scale=o.cfg_scale,
                                top_k=o.top_k)
    params = [p for n, p in model.named_parameters() if not n.startswith("vq.")]
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, o.lr, total_steps=o.ar_steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(o.seed + 1)
    spec, n = model.arx_decoder, GRID * GRID
    empty = [(torch.zeros(o.batch, spec["num_kv_heads"], 0, spec["head_dim"]),) * 2
             for _ in range(spec["num_layers"])]
    pos = torch.arange(n)[None].expand(o.batch, -1)
    model.train()
    for step in range(o.ar_steps):
        idx = torch.randint(0, len(ids), (o.batch,), generator=gen)
        lab = torch.where(torch.rand(o.batch, generator=gen) < o.null_prob, 10, labels[idx])
        seq = torch.cat([(lab + CODEBOOK)[:, None], ids[idx, :-1]], 1)  # class, t0..t14
        logits, _ = model(seq, pos, empty)
        loss = F.cross_entropy(logits.reshape(-1, CODEBOOK), ids[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == o.ar_steps - 1:
            log(f"ar step {step}: loss {loss.item():.4f}")
    return model.eval(), {"ar_final_loss": loss.item()}


def digit_classifier(target, labels, steps: int = 600) -> dict:
    """A small MLP classifier of 16x16 digits (256 -> 64 ReLU -> 10), fitted on the real ones
    (shifts included: a linear model reaches only 66% on them): the tests read it from
    train_metrics.json to check that a generated digit is the one asked for, in NumPy, without
    scikit-learn. Its accuracy on the real digits is recorded beside it."""
    torch.manual_seed(0)
    x = target.reshape(len(target), -1)
    mlp = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(mlp(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (mlp(x).argmax(-1) == labels).float().mean().item()
    return {"layers": [[m.weight.detach().T.round(decimals=4).tolist(),
                        m.bias.detach().round(decimals=4).tolist()] for m in mlp[::2]],
            "accuracy": accuracy}


def write_samples(bundle: Path, o: DigitsOptions) -> None:
    """samples.png: two images of each digit (rows 0-4, 5-9, twice) at the bundle's defaults,
    through the runtime, as `arx generate --class c --seed 0` draws them (the README shows it)."""
    from arx.manifest import read_manifest
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.image_generate import ImageOptions, decode_pixels, generate_images, image_info
    from arx.runtime.image_output import grid, to_uint8, write_png
    from arx.runtime.sampler import SamplingOptions

    m = read_manifest(bundle)
    info = image_info(m)
    options = ImageOptions(cfg_scale=o.cfg_scale, sampling=SamplingOptions(
        do_sample=True, top_k=o.top_k, seed=o.seed))
    with DecoderSession(bundle) as session:
        result = generate_images(session, list(range(10)) * 2, options)
    pixels = decode_pixels(bundle, info, m, result.tokens)
    write_png(bundle / "samples.png", grid(to_uint8(pixels, info.pixel_range), gap=2), scale=4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    for f in DigitsOptions.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    o = DigitsOptions(**{k: getattr(args, k) for k in DigitsOptions.__dataclass_fields__})
    torch.manual_seed(o.seed)
    torch.set_num_threads(o.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    x, target, labels = load_digits_tensor()
    vq, ids, metrics = train_vq(x, target, o, log)
    model, ar_metrics = train_ar(ids, labels, vq, o, log)
    metrics.update(ar_metrics, train_s=round(time.time() - t0, 1), options=asdict(o),
                   torch=torch.__version__, classifier=digit_classifier(target, labels))
    from arx.export.exporter import ExportOptions, export_model

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model, Path(tmp) / "model.pt")
        export_model(source=Path(tmp) / "model.pt", output=args.out,
                     options=ExportOptions(overwrite=True))
    (args.out / "train_metrics.json").write_text(json.dumps(metrics) + "\n")
    write_samples(args.out, o)
    log(f"wrote {args.out}: {json.dumps({k: v for k, v in metrics.items() if k != 'classifier'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
