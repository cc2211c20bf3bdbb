"""A VAR-shaped next-scale model (Tian et al., arXiv 2404.02905), written for the tests from the
paper and the description of FoundationVision/VAR in /work/shared/REFERENCES.md, section 1.

    VQVAE           image ─encoder─ quant_conv ─► f (B, Cvae, h, w) ─ multi-scale residual VQ:
                    per scale k (side pn_k): area-downsample what is left, nearest code, embed,
                    bicubic-upsample to h x w, phi_k (0.5 h + 0.5 conv(h)), add to f_hat
                    f_hat ─post_quant_conv─ decoder ─► pixels in [-1, 1]
    TinyVAR         transformer over the L = sum(pn_k^2) tokens of all scales: block k is the
                    word_embed of f_hat area-downsampled to pn_k (block 0 the class embedding,
                    the SOS), plus level and position embeddings; AdaLN from the class embedding
                    in every block and before the head; q and k L2-normalised, q scaled by a
                    learned per-head factor, softmax scale 1; attention block-causal (a scale
                    sees itself and every coarser one)

`TinyVAR.generate` is the module's own loop (VAR's `autoregressive_infer_cfg`: the doubled batch
[cond; null], guidance t = cfg * k / (S - 1) mixed as (1 + t) cond - t uncond, top-k/top-p per
position), the reference arx's runtime is compared with. `forward` is the arx protocol
(README, "Next-scale prediction"): inputs_embeds = [features | class embedding] per position.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arx.export import kv_attention

PATCH_NUMS = (1, 2, 3, 4, 6)


class Phi(nn.Conv2d):
    """VAR's quant_resi: h -> (1 - r) h + r conv3x3(h)."""

    def __init__(self, c: int, ratio: float = 0.5):
        super().__init__(c, c, 3, padding=1)
        self.ratio = ratio

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class Quantizer(nn.Module):
    """VAR's VectorQuantizer2: a codebook (not normalised) and phi convs shared over scales."""

    def __init__(self, vocab: int, cvae: int, patch_nums=PATCH_NUMS, n_phi: int = 2):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(vocab, cvae)
        self.embedding.weight.data.uniform_(-1 / vocab, 1 / vocab)
        self.phis = nn.ModuleList(Phi(cvae) for _ in range(n_phi))
        self.ticks = np.linspace(1 / (2 * n_phi), 1 - 1 / (2 * n_phi), n_phi)

    def phi(self, si: int) -> Phi:
        """The conv whose tick is nearest to si / (S - 1)."""
        at = si / (len(self.patch_nums) - 1)
        return self.phis[int(np.argmin(np.abs(self.ticks - at)))]

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat, h_BChw):
        """f_hat after scale si's embedded tokens h (B, Cvae, pn, pn), and the next scale's
        input map: f_hat area-downsampled to the next side (the last scale: f_hat itself)."""
        hw = self.patch_nums[-1]
        if si != SN - 1:
            h = self.phi(si)(F.interpolate(h_BChw, size=(hw, hw), mode="bicubic"))
            f_hat = f_hat + h  # VAR adds in place; a new tensor keeps the traced stage pure
            nxt = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")
        f_hat = f_hat + self.phi(si)(h_BChw)
        return f_hat, f_hat

    def encode(self, f):
        """Residual quantization of f (B, Cvae, hw, hw): (f_hat, [ids (B, pn^2) per scale])."""
        b, c, hw, _ = f.shape
        rest, f_hat, ids = f, torch.zeros_like(f), []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if si != last else rest
            flat = z.permute(0, 2, 3, 1).reshape(-1, c)
            idx = torch.cdist(flat, self.embedding.weight).argmin(-1).view(b, pn * pn)
            h = self.embedding(idx).transpose(1, 2).reshape(b, c, pn, pn)
            if si != last:
                h = F.interpolate(h, size=(hw, hw), mode="bicubic")
            h = self.phi(si)(h)
            f_hat, rest = f_hat + h, rest - h
            ids.append(idx)
        return f_hat, ids

    def ids_to_var_input(self, ids, hw: int):
        """Teacher forcing (VAR's idxBl_to_var_input): the inputs of scales 1..S-1 (B, L - 1, Cvae)."""
        b, c = ids[0].shape[0], self.embedding.weight.shape[1]
        f_hat, out = torch.zeros(b, c, hw, hw), []
        for si, pn in enumerate(self.patch_nums[:-1]):
            h = self.embedding(ids[si]).transpose(1, 2).reshape(b, c, pn, pn)
            f_hat, nxt = self.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h)
            out.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class VQVAE(nn.Module):
    """A tiny multi-scale VQ-VAE: pixels (B, ch, 2 hw, 2 hw) <-> f (B, Cvae, hw, hw)."""

    def __init__(self, vocab: int = 64, cvae: int = 8, patch_nums=PATCH_NUMS, channels: int = 1,
                 width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
                                     nn.Conv2d(width, cvae, 1))
        self.quant_conv = nn.Conv2d(cvae, cvae, 3, padding=1)
        self.quantize = Quantizer(vocab, cvae, patch_nums)
        self.post_quant_conv = nn.Conv2d(cvae, cvae, 3, padding=1)
        self.decoder = nn.Sequential(nn.Conv2d(cvae, width, 3, padding=1), nn.SiLU(),
                                     nn.Upsample(scale_factor=2, mode="nearest"),
                                     nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(width, channels, 3, padding=1))

    def fhat_to_img(self, f_hat):
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def forward(self, img, beta: float = 0.25):
        """(reconstruction, VQ loss, ids per scale) for training."""
        f = self.quant_conv(self.encoder(img))
        f_hat, ids = self.quantize.encode(f)
        vq_loss = F.mse_loss(f_hat.detach(), f) * beta + F.mse_loss(f_hat, f.detach())
        f_st = (f_hat.detach() - f.detach()) + f  # straight-through to the encoder
        return self.decoder(self.post_quant_conv(f_st)), vq_loss, ids


class AdaLNBlock(nn.Module):
    """VAR's AdaLNSelfAttn: SiLU -> Linear(D, 6C) gives gamma1, gamma2, scale1, scale2, shift1,
    shift2; each branch is LN(x)(1 + scale) + shift -> attention or FFN -> x gamma -> residual."""

    def __init__(self, c: int, d: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, c // heads
        self.ln = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * c))
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.scale_mul = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.ffn = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * c, c))

    def forward(self, x, cond, past, bias=None):
        """x (B, S, C), cond (B, 1, D), past (k, v) each (B, H, P, hd); bias: a training mask
        (S, S) over a whole sequence with no past. -> x, (k_all, v_all)."""
        b, s, c = x.shape
        g1, g2, s1, s2, sh1, sh2 = self.ada(cond).view(b, 1, 6, c).unbind(2)
        h = self.ln(x) * (1 + s1) + sh1
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1) * self.scale_mul.clamp(max=math.log(100)).exp()
        k = F.normalize(k, dim=-1)
        if bias is not None:
            y, present = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0), None
        else:  # the step's whole block sees itself and every coarser scale
            y, k_all, v_all = kv_attention(q, k, v, *past, scale=1.0, mask="block")
            present = (k_all, v_all)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, c)) * g1
        x = x + self.ffn(self.ln(x) * (1 + s2) + sh2) * g2
        return x, present


class TinyVAR(nn.Module):
    def __init__(self, vae: VQVAE | None = None, num_classes: int = 10, depth: int = 2,
                 width: int = 64, heads: int = 4, cfg_scale: float = 2.0, top_k: int = 0,
                 top_p: float = 1.0):
        super().__init__()
        self.vae = vae or VQVAE()
        q = self.vae.quantize
        self.patch_nums, vocab = q.patch_nums, q.embedding.num_embeddings
        self.cvae, c = q.embedding.embedding_dim, width
        seq = sum(pn * pn for pn in self.patch_nums)
        self.arx_decoder = {"num_layers": depth, "num_kv_heads": heads, "head_dim": c // heads,
                            "vocab_size": vocab, "max_seq_len": seq}
        self.arx_var = {"patch_nums": list(self.patch_nums), "num_classes": num_classes,
                        "null_class": num_classes, "vq": "vae", "pixel_range": [-1.0, 1.0],
                        "cfg_scale": cfg_scale, "top_k": top_k, "top_p": top_p}
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, c)  # the last row: the null class
        self.pos_start = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.pos_1LC = nn.Parameter(torch.randn(1, seq, c) * 0.02)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), c)
        levels = [si for si, pn in enumerate(self.patch_nums) for _ in range(pn * pn)]
        self.register_buffer("lvl_1L", torch.tensor(levels))
        self.word_embed = nn.Linear(self.cvae, c)
        self.blocks = nn.ModuleList(AdaLNBlock(c, c, heads) for _ in range(depth))
        self.head_ln = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        self.head = nn.Linear(c, vocab)

    def lvl_pos(self):
        return self.lvl_embed(self.lvl_1L)[None] + self.pos_1LC  # (1, L, C)

    def transformer(self, x, cond, past, bias=None):
        """x (B, S, C), cond (B, 1, D) -> logits (B, S, V), present (L pairs)."""
        present = []
        for block, pair in zip(self.blocks, past):
            x, kv = block(x, cond, pair, bias)
            present.append(kv)
        scale, shift = self.head_ada(cond).view(x.shape[0], 1, 2, -1).unbind(2)
        return self.head(self.head_ln(x) * (1 + scale) + shift), present

    def forward(self, inputs_embeds, position_ids, past_key_values):
        """The arx protocol: inputs_embeds (B, S, Cvae + D) = each position's input features
        (the downsampled f_hat; ignored at position 0, the SOS) and its row's class embedding;
        position_ids (B, S) the token's index among the L tokens of all scales."""
        feat, cond = inputs_embeds[..., :self.cvae], inputs_embeds[:, :1, self.cvae:]
        sos = (position_ids == 0)[..., None]
        x = torch.where(sos, cond + self.pos_start, self.word_embed(feat))
        x = x + self.lvl_pos()[0][position_ids]
        return self.transformer(x, cond, past_key_values)

    def forward_train(self, labels, ids, drop: float = 0.1, x_in=None):
        """Teacher-forced logits (B, L, V) with VAR's block-causal mask and class dropout;
        x_in: ids_to_var_input(ids), when the caller has it (a frozen VQ-VAE)."""
        b = labels.shape[0]
        labels = torch.where(torch.rand(b) < drop, torch.full_like(labels, self.num_classes), labels)
        cond = self.class_emb(labels)[:, None]
        if x_in is None:
            x_in = self.vae.quantize.ids_to_var_input(ids, self.patch_nums[-1])
        x = torch.cat([cond + self.pos_start, self.word_embed(x_in)], dim=1) + self.lvl_pos()
        bias = self.lvl_1L[:, None] >= self.lvl_1L[None, :]  # query level >= key level
        return self.transformer(x, cond, [None] * len(self.blocks), bias)[0]

    @torch.no_grad()
    def generate(self, labels, cfg: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 choose=None, generator=None):
        """VAR's autoregressive_infer_cfg. -> (ids per scale [(B, pn^2)], pixels (B, C, H, W)).
        choose(si, logits (2B, n, V), t) -> (B, n) ids replaces the selection (greedy over the
        mixed logits when top_k == 0 and top_p == 1, else VAR's top-k/top-p sampling)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        b, n_scales, hw = labels.shape[0], len(self.patch_nums), self.patch_nums[-1]
        cond = self.class_emb(torch.cat([labels, torch.full_like(labels, self.num_classes)]))
        cond = cond[:, None]  # (2B, 1, D)
        lvl_pos = self.lvl_pos()
        x = cond + self.pos_start + lvl_pos[:, :1]
        heads, hd = self.arx_decoder["num_kv_heads"], self.arx_decoder["head_dim"]
        past = [(torch.zeros(2 * b, heads, 0, hd),) * 2 for _ in self.blocks]
        f_hat, cur, out = torch.zeros(b, self.cvae, hw, hw), 0, []
        for si, pn in enumerate(self.patch_nums):
            logits, past = self.transformer(x, cond, past)
            t = cfg * si / (n_scales - 1)
            if choose is not None:
                idx = choose(si, logits, t)
            else:
                mixed = (1 + t) * logits[:b] - t * logits[b:]
                idx = _top_k_top_p(mixed, top_k, top_p, generator)
            out.append(idx)
            h = self.vae.quantize.embedding(idx).transpose(1, 2).reshape(b, self.cvae, pn, pn)
            f_hat, nxt = self.vae.quantize.get_next_autoregressive_input(si, n_scales, f_hat, h)
            if si != n_scales - 1:
                cur += pn * pn
                width = self.patch_nums[si + 1] ** 2
                x = self.word_embed(nxt.flatten(2).transpose(1, 2)) + lvl_pos[:, cur:cur + width]
                x = x.repeat(2, 1, 1)
        return out, self.vae.fhat_to_img(f_hat)


def _top_k_top_p(logits, top_k: int, top_p: float, generator):
    """(B, n, V) -> (B, n): argmax when neither filter is on, else one draw per position."""
    if top_k == 0 and top_p >= 1.0:
        return logits.argmax(-1)
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        srt, order = logits.sort(dim=-1, descending=False)
        drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    probs = logits.softmax(-1).flatten(0, 1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])


def tiny_var(seed: int = 0, **kwargs) -> TinyVAR:
    """Random weights, VAR's schedule 1, 2, 3, 4, 6 over a 64-code, 8-channel VQ-VAE."""
    torch.manual_seed(seed)
    return TinyVAR(VQVAE(), **kwargs).eval()
