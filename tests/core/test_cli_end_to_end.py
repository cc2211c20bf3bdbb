"""The user's path through the CLI: export a folder with a tokenizer, inspect, generate text."""

from __future__ import annotations

import json

import pytest

from arx.cli import main
from tokenizer_fixtures import make_llama


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("e2e")
    src = make_llama(folder / "hf")
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, initializer_range=0.2)
    LlamaForCausalLM(config).eval().save_pretrained(src)
    out = folder / "model.arx"
    assert main(["export", str(src), "-o", str(out), "-q"]) == 0
    return src, out


def test_inspect_shows_stages_io_kv_and_parity(text_bundle, capsys):
    _, bundle = text_bundle
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    for fragment in ("family     llama", "update in_place", "past_key_values.{i}.key",
                     "present.{i}.value", "parity     passed", "tokenizer.json"):
        assert fragment in out
    assert main(["inspect", str(bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv"]["layers"] == 2


def test_streamed_text_equals_decoded_tokens(text_bundle, capsys):
    from transformers import AutoTokenizer

    src, bundle = text_bundle
    args = ["generate", str(bundle), "--prompt", "def fib(n):", "--max-new-tokens", "24", "--greedy"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    seq = result["sequences"][0]
    tok = AutoTokenizer.from_pretrained(src)
    assert seq["prompt_ids"] == tok("def fib(n):")["input_ids"]  # BOS as HF adds it
    assert streamed.rstrip("\n") == "def fib(n):" + tok.decode(seq["tokens"], skip_special_tokens=True)
    assert seq["text"] == tok.decode(seq["tokens"], skip_special_tokens=True)


def test_batch_of_text_prompts_and_seeded_sampling(text_bundle, capsys):
    _, bundle = text_bundle
    base = ["generate", str(bundle), "--prompt", "hello", "--prompt", "a longer prompt here",
            "--max-new-tokens", "8", "--temperature", "0.9", "--top-p", "0.9", "--json"]
    runs = []
    for seed in ("7", "7", "8"):
        assert main(base + ["--seed", seed]) == 0
        runs.append([s["tokens"] for s in json.loads(capsys.readouterr().out)["sequences"]])
    assert len(runs[0]) == 2 and all(len(t) >= 1 for t in runs[0])
    assert runs[0] == runs[1]  # same seed, same tokens
    assert runs[0] != runs[2]  # another seed, (almost surely) other tokens
