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
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=160, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                             bos_token_id=1, eos_token_id=2, initializer_range=0.25)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2")


def make_hf_model(family: str, folder: Path, seed: int = 0):
    """Build, save (save_pretrained) and return a tiny model of `family`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32).eval()
    model.save_pretrained(folder)
    return model
