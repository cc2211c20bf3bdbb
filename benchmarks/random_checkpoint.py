"""Random Hugging Face checkpoints written shard by shard, never whole in memory.

The export benchmark (bench_export.py) and the streamed-export tests need bf16 checkpoints of
real shapes (Llama-3.2-1B, Llama-3.1-8B, ~300M) without downloading them. The tensor names and
shapes come from the model built on the meta device; each tensor is drawn, cast and written in
turn, and a shard is flushed once it holds `shard_bytes`, with the index save_pretrained writes.

Scales are chosen so the random model's next-token logits are spread (std ~1, top-2 gaps far
above float rounding): greedy tokens then compare the math, not near-ties.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
                    rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, max_position_embeddings=131072, tie_word_embeddings=False,
                    rope_theta=500000.0, rope_scaling=LLAMA_3_2_1B["rope_scaling"])
LLAMA_300M = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4,
                  max_position_embeddings=2048, tie_word_embeddings=False)


def write_llama(folder: Path, shape: dict, *, dtype: str = "bfloat16", seed: int = 0,
                shard_bytes: int = 2 << 30) -> int:
    """Write config.json and model-*.safetensors (+ index when sharded); return the bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, dtype=dtype,
                         architectures=["LlamaForCausalLM"])  # as save_pretrained writes it
    with torch.device("meta"):
        names = {n: t.shape for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict] = [{}]
    size = total = 0
    for name, shape_ in names.items():
        t = _draw(name, tuple(shape_), gen).to(getattr(torch, dtype))
        if size and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size, total = size + t.nbytes, total + t.nbytes
        if size >= shard_bytes:  # flush now: the next tensor starts a new shard
            _flush(folder, shards, save_file)
    _flush(folder, shards, save_file, last=True)
    config.save_pretrained(folder)
    return total


def _draw(name: str, shape: tuple, gen):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(shape[-1])
    return torch.randn(shape, generator=gen) * std


def _flush(folder: Path, shards: list[dict], save_file, last: bool = False) -> None:
    """Write every shard still held (in place: only its names stay), then on the last call
    rename them model-0000i-of-0000n and write the index."""
    for i, shard in enumerate(shards):
        if shard and not isinstance(next(iter(shard.values())), str):
            save_file(shard, str(folder / f"shard-{i}.tmp"), metadata={"format": "pt"})
            shards[i] = {n: "" for n in shard}  # the tensors go, the names stay for the index
    if not last:
        return
    n = len(shards)  # none is empty: a shard is only started for a tensor
    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / f"shard-{i}.tmp").rename(folder / name)
        weight_map.update({t: name for t in shard})
    if n > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1), encoding="utf-8")
