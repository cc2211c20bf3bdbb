"""The family registry beyond the Llama-likes: the tiny configs' features bite (so the greedy ==
HF tests check them), what arx refuses it says in one line, and the partial-rotary reorder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tiny_models import hf_config

from arx.errors import ArxError
from arx.export.families import FAMILIES, family_for_model_type


def _logits(cfg, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family, change", [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=4096)),  # the tests' 73-token sequences pass the window
    ("gemma3_text", dict(sliding_window=4096)),
    ("olmo", dict(clip_qkv=None)),
    ("smollm3", dict(no_rope_layers=[1, 1])),
    ("qwen3_moe", dict(num_experts_per_tok=4)),  # top-2 routing, not all experts
    ("qwen3_moe", dict(norm_topk_prob=True)),  # the k weights left unnormalised
    ("mixtral", dict(num_experts_per_tok=4)),
])
def test_tiny_config_features_bite(family, change):
    """Turning the feature off changes the tiny model's logits, so the exported graph must
    implement it to equal HF."""
    ids = torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(1))
    cfg = hf_config(family)
    off = hf_config(family)
    for k, v in change.items():
        setattr(off, k, v)
    if family == "smollm3":
        off.layer_types = cfg.layer_types
    diff = (_logits(cfg, ids) - _logits(off, ids)).abs().max().item()
    assert diff > 1e-2, f"{family} {change}: {diff}"


def test_unknown_architecture_lists_every_family():
    with pytest.raises(ArxError) as e:
        family_for_model_type("falcon")
    for name in ("gemma", "gemma2", "gemma3_text", "phi", "olmo", "olmo2", "granite", "smollm3",
                 "gpt_neox", "stablelm", "mixtral", "qwen3_moe", "llama"):
        assert name in str(e.value).split("supported: ")[1]
    assert set(FAMILIES) >= {"mixtral", "qwen3_moe"}


def test_phi_with_qk_layernorm_is_refused():
    cfg = hf_config("phi")
    cfg.qk_layernorm = True
    with pytest.raises(ArxError, match="qk_layernorm=True is not supported"):
        FAMILIES["phi"].read_config(cfg)


def test_inputs_embeds_refused_where_the_embedding_scales(hf_model_dir, tmp_path):
    from arx.export.exporter import ExportOptions, export_model

    out = tmp_path / "g.arx"
    with pytest.raises(ArxError, match="scales its table"):
        export_model(source=hf_model_dir("gemma")[0], output=out,
                     options=ExportOptions(progress=False, inputs_embeds=True))
    assert not out.exists()


@pytest.mark.parametrize("head_dim, rotary", [(16, 8), (32, 8), (80, 20), (64, 16)])
def test_rotary_reorder_keeps_attention_scores(head_dim, rotary):
    """Widened tables on reordered dims rotate exactly what HF rotates: q.k per position pair
    equals HF's rotate-half on the first `rotary` dims (StableLM-3B: D 80, R 20)."""
    from arx.export.rotary_layout import head_permutation, padded_rotary_dim, widen_tables

    base = FAMILIES["llama"].read_config(hf_config("llama"))
    cfg = dataclasses.replace(base, head_dim=head_dim, rotary_dim=rotary)
    wide = padded_rotary_dim(cfg)
    assert wide % 16 == 0 and rotary <= wide <= head_dim
    pos = np.arange(6)[:, None]
    freqs = pos / 10000 ** (np.arange(0, rotary, 2) / rotary)  # (S, R/2)
    tables = {"default": (np.cos(freqs), np.sin(freqs))}
    (cos, sin), = widen_tables(tables, cfg).values()
    perm = head_permutation(cfg)
    perm = np.arange(head_dim) if perm is None else perm
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 6, head_dim))

    def rope(x, c, s, r):  # rotate-half on the first r dims, as HF and GroupQueryAttention
        x1, x2, rest = x[:, :r // 2], x[:, r // 2:r], x[:, r:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=1)

    hf = rope(q, np.cos(freqs), np.sin(freqs), rotary) @ rope(k, np.cos(freqs), np.sin(freqs), rotary).T
    ours = rope(q[:, perm], cos, sin, wide) @ rope(k[:, perm], cos, sin, wide).T
    np.testing.assert_allclose(ours, hf, rtol=1e-10, atol=1e-10)
