"""The user's path through the CLI: export a folder with a tokenizer, inspect, generate text."""

from __future__ import annotations

import json

import pytest

from arx.cli import main
from tokenizer_fixtures import make_text_llama


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    src = make_text_llama(folder / "hf")
    out = folder / "model.arx"
    assert main(["export", str(src), "-o", str(out), "-q"]) == 0
    return src, out


def test_inspect_shows_stages_io_kv_and_parity(text_bundle, capsys):
    _, bundle = text_bundle
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    for fragment in ("family     llama", "update in_place", "past_key_values.{i}.key",
                     "present.{i}.value", "parity     passed", "tokenizer.json",
                     "pipeline   text-generation: loop decoder samples logits -> text ids",
                     "stage      decoder: decoder.onnx (ids: text)"):
        assert fragment in out
    assert main(["inspect", str(bundle), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["format_version"] == 2 and manifest["stages"]["decoder"]["kv"]["layers"] == 2


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


@pytest.fixture(scope="module")
def short_text_bundle(text_bundle, tmp_path_factory):
    """The same model with a 16-token context: the bundle's default of 64 new tokens never fits."""
    src, _ = text_bundle
    out = tmp_path_factory.mktemp("short") / "short.arx"
    assert main(["export", str(src), "-o", str(out), "--max-seq-len", "16", "-q"]) == 0
    return out


def test_default_new_tokens_stop_at_the_context(short_text_bundle, capsys):
    """No --max-new-tokens: generate until the context is full, finish reason `length`, in the
    JSON and after streamed text."""
    base = ["generate", str(short_text_bundle), "--greedy", "--no-eos-stop"]
    assert main(base + ["--prompt-ids", "1,5,9", "--json"]) == 0
    seq = json.loads(capsys.readouterr().out)["sequences"][0]
    assert len(seq["tokens"]) == 16 - 3 and seq["finish_reason"] == "length"

    assert main(base + ["--prompt", "def fib(n):", "--json"]) == 0
    seq = json.loads(capsys.readouterr().out)["sequences"][0]
    assert len(seq["prompt_ids"]) + len(seq["tokens"]) == 16 and seq["finish_reason"] == "length"
    assert main(base + ["--prompt", "def fib(n):"]) == 0  # streamed
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == "def fib(n):" + seq["text"]
    assert out.err.startswith(f"[{len(seq['tokens'])} tokens, finish length, ")


def test_max_new_tokens_context_and_explicit_counts(short_text_bundle, capsys):
    base = ["generate", str(short_text_bundle), "--prompt-ids", "1,5,9", "--greedy",
            "--no-eos-stop", "--json"]
    for flag, want in (("context", 13), ("5", 5), ("13", 13)):
        assert main(base + ["--max-new-tokens", flag]) == 0
        seq = json.loads(capsys.readouterr().out)["sequences"][0]
        assert (len(seq["tokens"]), seq["finish_reason"]) == (want, "length"), flag


def test_prepack_choice_keeps_the_tokens_and_sets_the_session(text_bundle, capsys):
    """--prepack auto leaves a float bundle's weights as stored (onnxruntime's
    session.disable_prepacking) where every step but the prompt's is one row, and packs them
    for a batch, speculation or quantized weights; the greedy tokens are the same either way."""
    import argparse

    from arx.commands.generate import text_backend
    from arx.manifest import read_manifest
    from arx.runtime.backend import BackendOptions, OrtBackend

    _, bundle = text_bundle
    manifest = read_manifest(bundle)
    flags = dict(device="cpu", threads=0, no_spin=False, draft=None, lookup=None, speculate=None)
    assert not text_backend(argparse.Namespace(prepack="auto", **flags), manifest).prepack
    assert text_backend(argparse.Namespace(prepack="auto", **flags), manifest, rows=2).prepack
    assert text_backend(argparse.Namespace(prepack="auto", **{**flags, "lookup": 2}),
                        manifest).prepack
    assert text_backend(argparse.Namespace(prepack="on", **flags), manifest).prepack
    manifest.extensions["quantization"] = {"scheme": "w4"}
    assert text_backend(argparse.Namespace(prepack="auto", **flags), manifest).prepack
    assert not text_backend(argparse.Namespace(prepack="off", **flags), manifest).prepack
    for prepack in (False, True):
        b = OrtBackend(bundle / "decoder.onnx", options=BackendOptions(prepack=prepack))
        so = b.session.get_session_options()
        try:
            entry = so.get_session_config_entry("session.disable_prepacking")
        except RuntimeError:  # never set
            entry = None
        assert entry == (None if prepack else "1")
        b.close()
    runs = []
    for choice in ("auto", "on"):
        assert main(["generate", str(bundle), "--prompt", "def fib(n):", "--max-new-tokens",
                     "12", "--greedy", "--json", "--prepack", choice]) == 0
        runs.append(json.loads(capsys.readouterr().out)["sequences"][0]["tokens"])
    assert runs[0] == runs[1] and len(runs[0]) == 12
