"""model.pt sources: a pickled Hugging Face model and a custom decoder-protocol module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arx.export.exporter import ExportOptions, export_model
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate
from custom_decoder import TinyCustomDecoder

QUIET = ExportOptions(progress=False)


@pytest.fixture(scope="module")
def custom_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("custom")
    torch.manual_seed(0)
    module = TinyCustomDecoder().eval()
    torch.save(module, folder / "model.pt")
    export_model(source=folder / "model.pt", output=folder / "custom.arx", options=QUIET)
    return module, folder / "custom.arx"


def _module_greedy(module, prompt: list[int], n: int) -> list[int]:
    """The module's own autoregressive loop, for reference."""
    spec = module.arx_decoder
    past = [(torch.zeros(1, spec["num_kv_heads"], 0, spec["head_dim"]),) * 2
            for _ in range(spec["num_layers"])]
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            p = past[0][0].shape[2]
            logits, past = module(ids, torch.arange(p, p + ids.shape[1])[None], past)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(ids))
    return out


def test_custom_protocol_module_exports_with_concat_cache(custom_bundle):
    module, bundle = custom_bundle
    m = read_manifest(bundle)
    assert m.kv.update == "concat" and m.family == "custom"
    assert m.parity["passed"] and m.parity["outputs"]["logits/decode"]["max_abs"] < 1e-4
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    with DecoderSession(bundle) as session:
        got = generate(session, prompts, GenerateOptions(max_new_tokens=20, stop_on_eos=False))
    for p, toks in zip(prompts, got.tokens):
        assert toks == _module_greedy(module, p, 20)


def test_pickled_hf_model_pt(tmp_path, hf_model_dir):
    _, model = hf_model_dir("qwen2")
    torch.save(model, tmp_path / "model.pt")
    m = export_model(source=tmp_path / "model.pt", output=tmp_path / "q.arx", options=QUIET)
    assert m.family == "qwen2" and m.kv.update == "in_place" and m.parity["passed"]


def test_in_place_cache_buffers_are_written_not_replaced(exported_bundle):
    with DecoderSession(exported_bundle("llama")) as session:
        cache = session.new_cache(2, 16)
        before = {k: id(v) for k, v in cache.buffers.items()}
        session.step(cache, np.array([[5, 6, 7], [8, 9, 0]]), np.array([3, 2]))
        assert {k: id(v) for k, v in cache.buffers.items()} == before
        keys = cache.buffers["past_key_values.0.key"].numpy()  # (B, kv_heads, S_max, D)
        assert np.abs(keys[0, :, :3]).sum() > 0 and np.abs(keys[0, :, 3:]).sum() == 0
        assert np.abs(keys[1, :, 2:]).sum() == 0  # padding of the shorter prompt not stored
        assert cache.lengths.tolist() == [3, 2]
