"""model.pt sources: a pickled Hugging Face model and a custom decoder-protocol module."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arx.export.exporter import ExportOptions, export_model
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, generate
from custom_decoder import TinyCustomDecoder, module_greedy

QUIET = ExportOptions(progress=False)


@pytest.fixture(scope="module")
def custom_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("custom")
    torch.manual_seed(0)
    module = TinyCustomDecoder().eval()
    torch.save(module, folder / "model.pt")
    export_model(source=folder / "model.pt", output=folder / "custom.arx", options=QUIET)
    return module, folder / "custom.arx"


def test_custom_protocol_module_exports_with_in_place_cache(custom_bundle):
    module, bundle = custom_bundle  # its cat + masked softmax takes the fast path
    m = read_manifest(bundle)
    assert m.kv.update == "in_place" and m.family == "custom"
    assert m.parity["passed"] and m.parity["outputs"]["logits/decode"]["max_abs"] < 1e-4
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    with DecoderSession(bundle) as session:
        got = generate(session, prompts, GenerateOptions(max_new_tokens=20, stop_on_eos=False))
    for p, toks in zip(prompts, got.tokens):
        assert toks == module_greedy(module, p, 20)


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


# --- model sources: the user's own module, torch.export programs, TorchScript -------------------

USER_MODULE = '''
from custom_decoder import TinyCustomDecoder


class UserDecoder(TinyCustomDecoder):
    """Defined in the user's own module, next to model.pt."""
'''


def _save_from_user_module(folder, name: str):
    """torch.save a model whose class lives in `folder/name.py`, then forget that module."""
    (folder / f"{name}.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(name).UserDecoder().eval()
        torch.save(module, folder / "model.pt")
    finally:
        sys.path.remove(str(folder))
        del sys.modules[name]


def test_model_class_in_a_module_next_to_the_file(tmp_path, monkeypatch):
    from arx.export.sources import load_source

    (tmp_path / "mine").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _save_from_user_module(tmp_path / "mine", "arx_test_user_model")
    monkeypatch.chdir(tmp_path / "elsewhere")  # exported from another folder
    path_before = list(sys.path)
    src = load_source(Path("../mine/model.pt"))
    assert type(src.module).__name__ == "UserDecoder" and src.kind == "protocol"
    assert sys.path == path_before  # the folder is on the import path only while loading
    sys.modules.pop("arx_test_user_model", None)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from arx.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def _error_line(code: int, err: str, out: Path) -> str:
    lines = [line for line in err.splitlines() if line.startswith("arx: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "\x1b" not in err and "Traceback" not in err
    assert not out.exists()
    return lines[0]


def test_unimportable_model_module_is_named(tmp_path, capsys):
    _save_from_user_module(tmp_path, "arx_test_gone_model")
    (tmp_path / "arx_test_gone_model.py").unlink()
    code, err = _cli(capsys, "export", str(tmp_path / "model.pt"), "-o", str(tmp_path / "o.arx"))
    line = _error_line(code, err, tmp_path / "o.arx")
    assert "'arx_test_gone_model'" in line and "PYTHONPATH" in line
    assert "torch.save(model)" not in line  # the user did exactly that: not the advice


def test_class_defined_in_the_saving_script(tmp_path, capsys, monkeypatch):
    class ScriptDecoder(TinyCustomDecoder):
        pass

    ScriptDecoder.__module__, ScriptDecoder.__qualname__ = "__main__", "ScriptDecoder"
    monkeypatch.setattr(sys.modules["__main__"], "ScriptDecoder", ScriptDecoder, raising=False)
    torch.save(ScriptDecoder().eval(), tmp_path / "model.pt")
    monkeypatch.delattr(sys.modules["__main__"], "ScriptDecoder")
    code, err = _cli(capsys, "export", str(tmp_path / "model.pt"), "-o", str(tmp_path / "o.arx"))
    line = _error_line(code, err, tmp_path / "o.arx")
    assert "ScriptDecoder" in line and "__main__" in line and "move the class into a module" in line


def _exported_program(module, dynamic: bool = True):
    dim = torch.export.Dim
    batch, seq, past = dim("batch"), dim("seq"), dim("past")
    spec = module.arx_decoder
    # a tensor of its own for each key and value: torch.export would trace one input given
    # twice as one (the values read as the keys)
    cache = [tuple(torch.zeros(2, spec["num_kv_heads"], 3, spec["head_dim"]) for _ in "kv")
             for _ in range(spec["num_layers"])]
    example = (torch.zeros(2, 3, dtype=torch.long), torch.arange(3, 6).repeat(2, 1), cache)
    dyn = ({0: batch, 1: seq}, {0: batch, 1: seq},
           [({0: batch, 2: past}, {0: batch, 2: past}) for _ in cache])
    return torch.export.export(module, example, dynamic_shapes=dyn if dynamic else None)


def test_exported_program_pt2_exports_like_the_module(tmp_path):
    torch.manual_seed(1)
    module = TinyCustomDecoder().eval()
    torch.export.save(_exported_program(module), tmp_path / "model.pt2",
                      extra_files={"arx_decoder.json": json.dumps(module.arx_decoder)})
    m = export_model(source=tmp_path / "model.pt2", output=tmp_path / "p.arx", options=QUIET)
    assert m.family == "custom" and m.kv.update == "in_place" and m.parity["passed"]
    assert m.parity["outputs"]["logits/decode"]["max_abs"] < 1e-4
    with DecoderSession(tmp_path / "p.arx") as session:
        got = generate(session, [[3, 14, 15, 92, 65]], GenerateOptions(max_new_tokens=12,
                                                                        stop_on_eos=False))
    assert got.tokens[0] == module_greedy(module, [3, 14, 15, 92, 65], 12)


@pytest.mark.parametrize("spec, dynamic, fragment", [
    (None, True, "without arx_decoder.json"),
    ("protocol", False, "batch length is fixed at 2"),
])
def test_exported_program_refused_in_one_line(tmp_path, capsys, spec, dynamic, fragment):
    module = TinyCustomDecoder().eval()
    extra = {"arx_decoder.json": json.dumps(module.arx_decoder)} if spec else None
    torch.export.save(_exported_program(module, dynamic), tmp_path / "model.pt2", extra_files=extra)
    code, err = _cli(capsys, "export", str(tmp_path / "model.pt2"), "-o", str(tmp_path / "o.arx"))
    line = _error_line(code, err, tmp_path / "o.arx")
    assert fragment in line and "corrupt" not in line


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_refused_without_torch_noise(tmp_path, capsys):
    torch.jit.script(TinyCustomDecoder().eval().head).save(str(tmp_path / "model.pt"))
    code, err = _cli(capsys, "export", str(tmp_path / "model.pt"), "-o", str(tmp_path / "o.arx"))
    line = _error_line(code, err, tmp_path / "o.arx")
    assert "TorchScript is not supported" in line and "torch.save(model)" in line
    assert err.splitlines() == [f"[1/5] loading {tmp_path / 'model.pt'} ... failed", line]


class DataDependentDecoder(TinyCustomDecoder):
    def forward(self, input_ids, position_ids, past_key_values):
        if input_ids.sum() > 10:  # Python control flow on data: torch.export cannot trace it
            input_ids = input_ids + 1
        return super().forward(input_ids, position_ids, past_key_values)


def test_trace_error_is_one_clean_line(tmp_path, capfd):
    from arx.errors import ArxError
    from arx.export.protocol import export_protocol_decoder
    from arx.export.sources import LoadedSource

    src = LoadedSource(tmp_path / "model.pt", DataDependentDecoder().eval(), "protocol", None, None, {})
    with pytest.raises(ArxError) as e:
        export_protocol_decoder(src, tmp_path, QUIET)
    message = str(e.value)
    assert "\x1b" not in message and "data-dependent" in message
    assert "test_sources_and_protocol.py line" in message and "input_ids.sum() > 10" in message
    printed = capfd.readouterr()
    assert "def forward" not in printed.err + printed.out  # torch's partial graph kept off the terminal
