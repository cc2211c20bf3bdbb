"""arx export --kv-dtype through the CLI: the bundle says its cache, inspect shows it, generate runs."""

from __future__ import annotations

import pytest

from arx.cli import main
from arx.manifest import read_manifest
from tokenizer_fixtures import make_text_llama


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_text_llama(tmp_path_factory.mktemp("kv-cli") / "hf")


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
