"""A custom nn.Module following the arx decoder protocol (not a Hugging Face model).

TinyCustomDecoder: a tiny pre-norm transformer with learned positions, a concatenated KV cache
and an explicit masked softmax; RopeGqaDecoder: RoPE before the cache, grouped KV heads, the
attention written one of several ways. What a user with their own architecture would write.
Importable by name so torch.save pickles resolve.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyCustomDecoder(nn.Module):
    def __init__(self, vocab=96, dim=32, heads=2, layers=2, max_seq_len=128):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.arx_decoder = {"num_layers": layers, "num_kv_heads": heads, "head_dim": dim // heads,
                            "vocab_size": vocab, "max_seq_len": max_seq_len}
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim),
                           "out": nn.Linear(dim, dim), "mlp": nn.Sequential(
                               nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                               nn.Linear(2 * dim, dim))})
            for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        nn.init.normal_(self.head.weight, std=0.5)

    def forward(self, input_ids, position_ids, past_key_values):
        b, s = input_ids.shape
        x = self.embed(input_ids) + self.pos(position_ids)
        present = []
        for blk, (pk, pv) in zip(self.blocks, past_key_values):
            q, k, v = blk["qkv"](blk["norm"](x)).split(x.shape[-1], dim=-1)
            q, k, v = (t.view(b, s, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, P+S, D)
            present.append((k, v))
            p = k.shape[2] - s
            mask = torch.ones(s, p + s, dtype=torch.bool).tril(diagonal=p)
            att = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            x = x + blk["out"]((att @ v).transpose(1, 2).reshape(b, s, -1))
            x = x + blk["mlp"](x)
        return self.head(x), present


def rope(x, positions, base: float = 10000.0):
    """Rotate-half RoPE of x (B, H, S, D) at positions (B, S), computed in the module."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = positions[:, None, :, None].float() * inv  # (B, 1, S, D/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


class RopeGqaDecoder(nn.Module):
    """A research-code style decoder: RoPE applied before the cache, fewer KV heads than query
    heads, attention written one of several plain ways (`attention`):

        "sdpa"          torch.cat + scaled_dot_product_attention(attn_mask=causal), heads
                        widened by repeat_interleave
        "softmax"       torch.cat + q @ k^T * scale, torch.where(mask, ., -inf), softmax, @ v,
                        heads widened HF-style (x[:, :, None].expand(...).reshape(...))
        "kv_attention"  the documented call arx.export.kv_attention
        "cache_length"  as "sdpa", but positions from the past's length, not position_ids
        "window"        as "sdpa" with a sliding-window mask of `window` keys
        "is_causal"     as "sdpa" with is_causal=True (top-left aligned: wrong after a past)
    """

    def __init__(self, attention="sdpa", vocab=96, dim=64, heads=4, kv_heads=2, layers=2,
                 max_seq_len=128, window=8):
        super().__init__()
        self.attention, self.window = attention, window
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.arx_decoder = {"num_layers": layers, "num_kv_heads": kv_heads,
                            "head_dim": dim // heads, "vocab_size": vocab, "max_seq_len": max_seq_len}
        kv_dim = kv_heads * self.head_dim
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.RMSNorm(dim), "q": nn.Linear(dim, dim, bias=False),
                           "kv": nn.Linear(dim, 2 * kv_dim, bias=False),
                           "o": nn.Linear(dim, dim, bias=False), "mlp": nn.Sequential(
                               nn.RMSNorm(dim), nn.Linear(dim, 2 * dim), nn.SiLU(),
                               nn.Linear(2 * dim, dim))})
            for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        nn.init.normal_(self.head.weight, std=0.5)

    def forward(self, input_ids, position_ids, past_key_values):
        b, s = input_ids.shape
        x, present = self.embed(input_ids), []
        for blk, (pk, pv) in zip(self.blocks, past_key_values):
            h = blk["norm"](x)
            q = blk["q"](h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k, v = (t.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
                    for t in blk["kv"](h).chunk(2, dim=-1))
            pos = position_ids
            if self.attention == "cache_length":
                pos = (pk.shape[2] + torch.arange(s))[None].expand(b, s)
            q, k = rope(q, pos), rope(k, pos)
            out, k, v = self._attend(q, k, v, pk, pv)
            present.append((k, v))
            x = x + blk["o"](out.transpose(1, 2).reshape(b, s, -1))
            x = x + blk["mlp"](x)
        return self.head(self.norm(x)), present

    def _attend(self, q, k, v, pk, pv):
        if self.attention == "kv_attention":
            from arx.export import kv_attention

            return kv_attention(q, k, v, pk, pv)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        s, t = q.shape[2], k.shape[2]
        mask = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
        if self.attention == "window":
            mask = mask & torch.ones(s, t, dtype=torch.bool).triu(diagonal=t - s - self.window + 1)
        n_rep = self.heads // self.kv_heads
        if self.attention == "softmax":
            kr, vr = (x[:, :, None].expand(-1, -1, n_rep, -1, -1).reshape(
                x.shape[0], self.heads, t, self.head_dim) for x in (k, v))
            att = (q @ kr.transpose(-2, -1)) * self.head_dim ** -0.5
            att = torch.where(mask, att, float("-inf")).softmax(dim=-1)
            return att @ vr, k, v
        kr, vr = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if self.attention == "is_causal":
            return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True), k, v
        return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask), k, v


def module_greedy(module, prompt: list[int], n: int) -> list[int]:
    """The module's own autoregressive loop at batch 1, growing its own cache: the reference."""
    spec = module.arx_decoder
    past = [(torch.zeros(1, spec["num_kv_heads"], 0, spec["head_dim"]),) * 2
            for _ in range(spec["num_layers"])]
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            p = past[0][0].shape[2]
            logits, past = module(ids, torch.arange(p, p + ids.shape[1])[None], past)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(ids))
    return out
