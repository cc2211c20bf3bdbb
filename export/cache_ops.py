"""`arx.export.kv_attention`: attention over a KV cache that always exports to the fast path.

    out, k_all, v_all = kv_attention(q, k, v, past_k, past_v, scale=None, mask="causal")
        q (B, H, S, D); k, v (B, Hkv, S, D): this step's, RoPE already applied; past_k, past_v
        (B, Hkv, P, D); H a multiple of Hkv. out (B, H, S, D); k_all, v_all (B, Hkv, P + S, D).
        mask "block": every query sees the whole step and the past (next-scale models, whose
        steps are whole scales; export/var_protocol.py), exported to the same in-place op and
        always stepped with the block mask.

In eager mode it is the plain math, `torch.cat` of past and new then causal
`scaled_dot_product_attention` (query i at absolute position P + i sees keys 0..P + i),
so a module calls it in its own loop and returns k_all, v_all as its present. Under
`arx export` it is one opaque op (`arx::kv_attention`) that export/fast_path.py replaces with
`arx::cache_attention`: the in-place cache, one GroupQueryAttention node per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("arx::kv_attention", mutates_args=())
def _kv_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    p, s = past_k.shape[2], q.shape[2]
    # bottom-right causal: SDPA's is_causal aligns top-left, wrong once there is a past
    mask = torch.ones(s, p + s, dtype=torch.bool, device=q.device).tril(diagonal=p)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, k_all, v_all


@torch.library.custom_op("arx::kv_block_attention", mutates_args=())
def _kv_block_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(  # no mask: the block sees itself
        q, k_all, v_all, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, k_all, v_all


@_kv_attention.register_fake
@_kv_block_attention.register_fake
def _(q, k, v, past_k, past_v, scale):
    k_all = past_k.new_empty((*past_k.shape[:2], past_k.shape[2] + k.shape[2], past_k.shape[3]))
    return torch.empty_like(q), k_all, torch.empty_like(k_all)


def kv_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
                 scale: float | None = None, mask: str = "causal") -> tuple[Tensor, Tensor, Tensor]:
    """Causal (or block) attention of q over past + new keys/values; see the module docstring."""
    if mask not in ("causal", "block"):
        raise ValueError(f"kv_attention's mask is 'causal' or 'block', not {mask!r}")
    if q.dim() != 4 or k.shape != v.shape or past_k.shape != past_v.shape or \
            q.shape[1] % k.shape[1]:
        raise ValueError(f"kv_attention takes q (B, H, S, D), k and v (B, Hkv, S, D), past_k "
                         f"and past_v (B, Hkv, P, D) with H a multiple of Hkv; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, past_k {tuple(past_k.shape)}")
    op = _kv_attention if mask == "causal" else _kv_block_attention
    return op(q, k, v, past_k, past_v, q.shape[-1] ** -0.5 if scale is None else scale)


@torch.library.custom_op("arx::cache_attention", mutates_args=())
def cache_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
                    attention_mask: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The in-place form, only ever traced (its ONNX translation is GroupQueryAttention):
    past_k/past_v are the (B, Hkv, S_max, D) cache buffers, written at each row's length
    (sum(attention_mask) - S), and returned as the presents."""
    raise RuntimeError("arx::cache_attention exists only in a graph arx export traces; call "
                       "arx.export.kv_attention in eager code")


@cache_attention.register_fake
def _(q, k, v, past_k, past_v, attention_mask, scale):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)
