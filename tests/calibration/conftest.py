"""Fixtures for the calibration tests: one tiny Llama bundle with a real tokenizer, and text.

The tokenizer comes from tests/tokenizer_fixtures.py, so calibration text goes through the
bundle tokenizer exactly as a user's would.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Sentences with a little variety; one calibration sample per line.
_WORDS = ("the quick brown fox jumps over the lazy dog while a small cat sleeps near the warm "
          "fire and the old man reads a long book about rivers mountains and the sea").split()


def make_text(n_lines: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(12, 30))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def make_llama_with_tokenizer(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) whose vocabulary is the test tokenizer's."""
    import torch
    import transformers as tf

    from tokenizer_fixtures import make_llama  # tests/ is on sys.path (pyproject pythonpath)

    make_llama(folder)
    vocab = tf.AutoTokenizer.from_pretrained(folder).backend_tokenizer.get_vocab_size(with_added_tokens=True)
    # intermediate 120: down_proj's K is not a multiple of the group size (padded last block)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=120, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.05)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_bundle(tmp_path_factory) -> Path:
    """An exported tiny Llama bundle with tokenizer.json (session-scoped: exported once)."""
    from arx.export.exporter import ExportOptions, export_model

    src = make_llama_with_tokenizer(tmp_path_factory.mktemp("hf-llama-tok"))
    out = tmp_path_factory.mktemp("calib-bundle") / "llama.arx"
    export_model(source=src, output=out, options=ExportOptions(progress=False))
    return out


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib-data") / "calib.txt"
    path.write_text(make_text(48), encoding="utf-8")
    return path
