"""arx export --kv-dtype through the CLI: the bundle says its cache, inspect shows it, generate runs."""

from __future__ import annotations

import pytest

from arx.cli import main
from arx.manifest import read_manifest
from tokenizer_fixtures import make_llama


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = make_llama(tmp_path_factory.mktemp("kv-cli") / "hf")
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, initializer_range=0.2)
    LlamaForCausalLM(config).eval().save_pretrained(src)
    return src


@pytest.mark.parametrize("flag,dtype,scales", [("fp16", "float16", ""),
                                               ("int8", "int8", ", per_channel scales")])
def test_export_kv_dtype_inspect_generate(flag, dtype, scales, hf_folder, tmp_path, capsys):
    out = tmp_path / "model.arx"
    assert main(["export", str(hf_folder), "-o", str(out), "--kv-dtype", flag, "-q"]) == 0
    assert read_manifest(out).kv.dtype == dtype
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f"{dtype}, update in_place{scales}" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "the quick brown", "--max-new-tokens", "6",
                 "--no-eos-stop"]) == 0
    assert capsys.readouterr().out.strip()
