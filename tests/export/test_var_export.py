"""arx export of a next-scale (VAR) module: the stages, the block attention, parity, refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from var_model import tiny_var

from arx.errors import ArxError
from arx.export import kv_attention
from arx.export.var_protocol import check_var_spec
from arx.manifest import read_manifest

TESTS = Path(__file__).resolve().parents[1]  # var_model.py, which the pickle names


@pytest.fixture(scope="module")
def bundle(var_export):
    return var_export[1]


def test_stages_pipeline_and_parity(bundle):
    m = read_manifest(bundle)
    assert m.pipeline.kind == "next-scale" and m.pipeline.feedback == "inputs_embeds"
    assert m.kv.update == "in_place" and "decoder_step" in m.stages  # block steps run there
    assert m.decoder.inputs[0].shape[-1] == 8 + 64  # features (Cvae) | class embedding (D)
    section = m.extensions["var"]
    assert section["patch_nums"] == [1, 2, 3, 4, 6] and section["tokens"] == 66
    names = ["var_class", *[f"var_next_input_{k}" for k in range(5)], "vq_decoder"]
    assert all((bundle / m.stages[n].file).is_file() for n in names)
    assert m.stages["var_next_input_2"].outputs[1].shape == ("batch_size", 16, 8)
    assert m.stages["vq_decoder"].outputs[0].shape == ("batch_size", 1, 12, 12)
    assert m.parity["passed"] is True
    outputs = m.parity["outputs"]
    assert outputs["logits/scale"]["max_abs"] <= 1e-3
    assert {"var_class.cond", "var_next_input_0.next_input", "var_next_input_4.f_hat_out",
            "vq_decoder.pixels"} <= set(outputs)
    assert all(o["max_abs"] <= 1e-3 for o in outputs.values())


def test_kv_attention_block_sees_the_whole_step():
    q, k, v = (torch.randn(1, 2, 3, 16) for _ in range(3))
    pk, pv = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    out, k_all, _ = kv_attention(q, k, v, pk, pv, mask="block")
    ref = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([pk, k], 2),
                                                           torch.cat([pv, v], 2))
    assert torch.allclose(out, ref, atol=1e-6) and k_all.shape[2] == 7
    causal, _, _ = kv_attention(q, k, v, pk, pv)
    assert not torch.allclose(causal[:, :, 0], out[:, :, 0])  # the first query sees less
    with pytest.raises(ValueError, match="'causal' or 'block'"):
        kv_attention(q, k, v, pk, pv, mask="window")


def test_block_attention_is_refused_outside_a_next_scale_model():
    from arx.export.fast_path import NotRecognised, trace_in_place
    from arx.manifest import KVLayout

    module = tiny_var()
    kv = KVLayout(layers=2, kv_heads=4, head_dim=16, max_seq_len=66)
    with pytest.raises(NotRecognised, match="only a next-scale model"):
        trace_in_place(module, kv, ["inputs_embeds"], ["logits"], embeds=72)


@pytest.mark.parametrize("change, fragment", [
    ({"patch_nums": [2, 3]}, "patch_nums must rise from 1"),
    ({"patch_nums": [1, 3, 2]}, "patch_nums must rise from 1"),
    ({"patch_nums": [1, 2, 9]}, "shorter than the 86 tokens"),
    ({"vq": "nope"}, "has no nn.Module 'nope'"),
    ({"null_class": 11}, "null_class row of class_emb"),
])
def test_bad_spec_one_line(change, fragment):
    module = tiny_var()
    with pytest.raises(ArxError, match=fragment.replace("(", r"\(")):
        check_var_spec(module, {**module.arx_var, **change})


def test_cli_refuses_a_spec_without_vq_and_writes_nothing(tmp_path):
    module = tiny_var()
    module.arx_var = {k: v for k, v in module.arx_var.items() if k != "vq"}
    torch.save(module, tmp_path / "model.pt")
    proc = subprocess.run([sys.executable, "-m", "arx", "export", str(tmp_path / "model.pt"),
                           "-o", str(tmp_path / "out.arx")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS)})
    # progress lines go to stderr before the error: only the error line is checked here
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("arx: error: ")
    assert "lacks vq" in proc.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
