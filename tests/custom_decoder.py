"""A custom nn.Module following the arx decoder protocol (not a Hugging Face model).

A tiny pre-norm transformer with learned positions and a concatenated KV cache: what a user
with their own architecture would write. Importable by name so torch.save pickles resolve.
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
