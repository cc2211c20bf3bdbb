"""Greedy runs compared across tests: Hugging Face `generate` on a left-padded batch, and the
bundle's own loop, both making NEW_TOKENS tokens per row."""

from __future__ import annotations

from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate

NEW_TOKENS = 64


def hf_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """HF generate on a left-padded batch, EOS disabled so every row makes NEW_TOKENS."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[:, width:].tolist()


def arx_greedy(bundle, prompts) -> list[list[int]]:
    with DecoderSession(bundle) as session:
        result = generate(session, prompts,
                          GenerateOptions(max_new_tokens=NEW_TOKENS, stop_on_eos=False))
    return result.tokens
