"""A LlamaGen-shaped class-to-image decoder and a small VQ decoder, written to the image protocol.

What a user's research code looks like (LlamaGen c2i, arXiv 2404.02905): the class label is one
prefix token from a table of num_classes + 1 rows (the last is the null class of classifier-free
guidance), image tokens follow in raster order with 2D RoPE over the grid, and a VQ decoder
turns a grid of codebook indices into pixels. The attention is the plain torch.cat + SDPA, with
RoPE applied by the module before the cat, so `arx export` takes the fast in-place path. Used by
the tests and by scripts/train_digits.py (models/arx-digits); importable by name so a pickled
model.pt resolves wherever `arx[export]` is installed.

Input ids: 0..V-1 are image tokens, V + c is class c, V + num_classes the null class (the
protocol's `class_token_offset` = V). Logits are over the codebook only (V), unless the module
is built with `text_vocab` T: then the vocabulary is shared with text (ids 0..T-1 text, T + k
image token k, `arx_image["codebook"] = [T, V]`) and the logits span T + V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_2d_table(grid: int, head_dim: int, prefix: int, base: float = 10000.0) -> torch.Tensor:
    """(prefix + grid^2, head_dim / 2, 2) cos/sin, LlamaGen's precompute_freqs_cis_2d: half the
    rotation pairs follow the row, half the column (raster order), head_dim/4 frequencies
    base^(-4m/head_dim) each, and zero rows for the prefix (its q/k become zero, not identity)."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    t = torch.outer(torch.arange(grid).float(), freqs)  # (grid, head_dim / 4)
    both = torch.cat([t[:, None, :].expand(-1, grid, -1), t[None, :, :].expand(grid, -1, -1)], -1)
    table = torch.stack([both.cos(), both.sin()], -1).flatten(0, 1)  # (grid^2, head_dim / 2, 2)
    return torch.cat([torch.zeros(prefix, half, 2), table])


def apply_rope_2d(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D), cis (B, S, D/2, 2): rotate interleaved pairs (x[2m], x[2m+1])."""
    xs = x.reshape(*x.shape[:-1], -1, 2)
    c, s = cis[:, None, :, :, 0], cis[:, None, :, :, 1]  # (B, 1, S, D/2)
    out = torch.stack([xs[..., 0] * c - xs[..., 1] * s, xs[..., 1] * c + xs[..., 0] * s], -1)
    return out.flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """Pre-norm attention (GQA, 2D RoPE before the cat, causal SDPA) + SwiGLU FFN."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.attn_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.d, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        hidden = 4 * dim * 2 // 3
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cis, past_k, past_v):
        b, s, _ = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(
            [self.heads * self.d, self.kv_heads * self.d, self.kv_heads * self.d], dim=-1)
        q = q.view(b, s, self.heads, self.d).transpose(1, 2)  # (B, H, S, D)
        k, v = (t.view(b, s, self.kv_heads, self.d).transpose(1, 2) for t in (k, v))
        q, k = apply_rope_2d(q, cis), apply_rope_2d(k, cis)  # before the cache
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, Hkv, P+S, D)
        t = k.shape[2]
        mask = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)  # bottom-right causal
        rep = self.heads // self.kv_heads
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                           v.repeat_interleave(rep, 1), attn_mask=mask)
        x = x + self.wo(y.transpose(1, 2).reshape(b, s, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h)), k, v


class VQDecoder(nn.Module):
    """Codebook indices (B, N) in raster order -> pixels (B, C, H, W) in about [-1, 1]:
    L2-normalised codebook lookup (B, E, g, g), 1x1 post_quant_conv, convs with nearest 2x
    upsamples (LlamaGen's decode_code, scaled down)."""

    def __init__(self, codebook: int, grid: int, embed_dim: int = 8, width: int = 32,
                 upsamples: int = 1, channels: int = 3):
        super().__init__()
        self.grid, self.embed_dim = grid, embed_dim
        self.embedding = nn.Embedding(codebook, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, width, 1)
        layers: list[nn.Module] = [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        for _ in range(upsamples):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.decoder = nn.Sequential(*layers)

    def quantized(self, tokens):
        """(B, N) -> (B, E, g, g): the normalised codebook entries on the grid."""
        z = F.normalize(self.embedding(tokens), dim=-1)  # (B, N, E)
        return z.transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, self.grid, self.grid)

    def forward(self, tokens):
        return self.decoder(self.post_quant_conv(self.quantized(tokens)))


class ClassToImageDecoder(nn.Module):
    """LlamaGen c2i, small: one class token, a grid of image tokens, 2D RoPE, CFG null class."""

    def __init__(self, num_classes: int = 10, codebook: int = 64, grid: int = 4, dim: int = 64,
                 heads: int = 4, kv_heads: int = 2, layers: int = 2, vq: VQDecoder | None = None,
                 cfg_scale: float = 4.0, top_k: int = 0, text_vocab: int = 0):
        """text_vocab > 0: a vocabulary shared with text (Emu3, Chameleon): ids 0..T-1 are text,
        image token k is id T + k, and the logits span both (arx samples the codebook only)."""
        super().__init__()
        self.codebook, self.num_classes, self.grid = codebook, num_classes, grid
        self.text_vocab, vocab = text_vocab, text_vocab + codebook
        head_dim = dim // heads
        n = grid * grid
        self.arx_decoder = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
                            "vocab_size": vocab, "max_seq_len": 1 + n}
        self.arx_image = {"grid": [grid, grid], "num_classes": num_classes,
                          "null_class": num_classes, "class_token_offset": vocab,
                          "vq_decoder": "vq", "pixel_range": [-1.0, 1.0], "cfg_scale": cfg_scale,
                          "top_k": top_k, "codebook": [text_vocab, codebook]}
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.cls_embedding = nn.Embedding(num_classes + 1, dim)  # row num_classes: the null class
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm, self.output = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.register_buffer("freqs_cis", rope_2d_table(grid, head_dim, prefix=1), persistent=False)
        self.vq = vq if vq is not None else VQDecoder(codebook, grid)

    def embed(self, input_ids):
        """Image (and text) tokens through tok_embeddings, class tokens (>= the vocabulary)
        through cls_embedding."""
        vocab = self.text_vocab + self.codebook
        is_class = input_ids >= vocab
        tok = self.tok_embeddings(torch.where(is_class, 0, input_ids))
        cls = self.cls_embedding(torch.where(is_class, input_ids - vocab, 0))
        return torch.where(is_class[..., None], cls, tok)

    def forward(self, input_ids, position_ids, past_key_values):
        x, cis, present = self.embed(input_ids), self.freqs_cis[position_ids], []
        for layer, (pk, pv) in zip(self.layers, past_key_values):
            x, k, v = layer(x, cis, pk, pv)
            present.append((k, v))
        return self.output(self.norm(x)), present


@torch.no_grad()
def generate_cfg(model: ClassToImageDecoder, labels: list[int], cfg_scale: float, choose) -> torch.Tensor:
    """LlamaGen's generate loop in PyTorch: prefill [cond; null] class tokens, then decode
    [tok; tok] with the module's own growing cache; logits mixed uncond + s (cond - uncond).
    `choose(k, logits_2b)` -> (B,) the ids of token k over the codebook's logits (a shared
    vocabulary's text columns cut off; fed back as text_vocab + id). Returns (B, grid^2) int64."""
    b, n = len(labels), model.grid * model.grid
    spec = model.arx_decoder
    past = [(torch.zeros(2 * b, spec["num_kv_heads"], 0, spec["head_dim"]),) * 2
            for _ in range(spec["num_layers"])]
    lo = model.text_vocab
    ids = torch.tensor(labels + [model.num_classes] * b)[:, None] + lo + model.codebook
    out = torch.zeros(b, n, dtype=torch.long)
    for k in range(n):
        p = past[0][0].shape[2]
        logits, past = model(ids, torch.arange(p, p + ids.shape[1])[None].expand(2 * b, -1), past)
        out[:, k] = choose(k, logits[:, -1, lo:lo + model.codebook])
        ids = torch.cat([out[:, k], out[:, k]])[:, None] + lo
    return out
