"""Fused scaled attention over a KV cache (`arx::kv_attention`): spec, reference, kernels."""

from .reference import MASK_MODES, AttentionOptions, kv_attention_reference, naive_attention

__all__ = ["MASK_MODES", "AttentionOptions", "kv_attention_reference", "naive_attention"]
