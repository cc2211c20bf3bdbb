"""Tiny random Hugging Face models of every supported family, made in the tests.

Weights are drawn with a large init scale so next-token logits are well separated: greedy
decoding then compares the math, not float rounding at near-ties.
"""

from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, initializer_range=0.25)


def hf_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, num_key_value_heads=2)
    if family == "mistral":  # sliding window shorter than the generated sequences
        return tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=24)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, num_key_value_heads=1)
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32)
    if family == "phi3":
        return tf.Phi3Config(**COMMON, num_key_value_heads=2, original_max_position_embeddings=256,
                             sliding_window=None)
    if family == "gemma":
        return tf.GemmaConfig(**COMMON, num_key_value_heads=2, head_dim=16)
    if family == "gemma2":  # caps below the tiny model's scores and logits; window passed
        return tf.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=24,
                               query_pre_attn_scalar=16, attn_logit_softcapping=3.0,
                               final_logit_softcapping=5.0)
    if family == "gemma3_text":  # layer 0 sliding (local RoPE base), layer 1 global
        return tf.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16,
                                   sliding_window=24, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"])
    if family == "phi":  # Phi-2: rotary on half of each head
        return tf.PhiConfig(**COMMON, num_key_value_heads=2, partial_rotary_factor=0.5)
    if family == "olmo":  # clip_qkv below the projections' range
        return tf.OlmoConfig(**COMMON, num_key_value_heads=2, clip_qkv=2.0)
    if family == "olmo2":
        return tf.Olmo2Config(**COMMON, num_key_value_heads=2)
    if family == "granite":
        return tf.GraniteConfig(**COMMON, num_key_value_heads=2, embedding_multiplier=2.0,
                                residual_multiplier=0.5, attention_multiplier=0.1,
                                logits_scaling=2.0)
    if family == "smollm3":  # layer 1 without RoPE
        return tf.SmolLM3Config(**COMMON, num_key_value_heads=2, no_rope_layers=[1, 0])
    if family == "gpt_neox":  # parallel residual, rotary on a quarter of each 32-wide head
        return tf.GPTNeoXConfig(**{**COMMON, "num_attention_heads": 2}, rotary_pct=0.25,
                                use_parallel_residual=True)
    if family == "stablelm":  # per-head q/k LayerNorm, rotary on a quarter of each head
        return tf.StableLmConfig(**{**COMMON, "num_attention_heads": 2}, num_key_value_heads=1,
                                 qk_layernorm=True, use_qkv_bias=True,
                                 partial_rotary_factor=0.25)
    if family == "mixtral":  # 4 experts, top-2, weights renormalised
        return tf.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2)
    if family == "qwen3_moe":  # top-2 of 4 without renormalising; layer 1 a dense MLP
        return tf.Qwen3MoeConfig(**COMMON, num_key_value_heads=2, head_dim=16, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=48,
                                 norm_topk_prob=False, mlp_only_layers=[1])
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=160, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                             bos_token_id=1, eos_token_id=2, initializer_range=0.25)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma", "gemma2",
            "gemma3_text", "phi", "olmo", "olmo2", "granite", "smollm3", "gpt_neox", "stablelm",
            "mixtral", "qwen3_moe")
# soft-capped attention (Gemma 2): the arx::kv_attention plugin has no softcap, so the TensorRT
# form refuses the plugin and takes --attention native (ONNX Attention's softcap)
NATIVE_ONLY = ("gemma2",)
PLUGIN_FAMILIES = tuple(f for f in FAMILIES if f not in NATIVE_ONLY)


def make_hf_model(family: str, folder: Path, seed: int = 0):
    """Build, save (save_pretrained) and return a tiny model of `family`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32).eval()
    model.save_pretrained(folder)
    return model
