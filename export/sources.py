"""Load what the user points `arx export` at into a torch module plus its description.

Accepted: a Hugging Face causal-LM folder (config.json + safetensors/bin weights), or a
`torch.save(model)` file holding a Hugging Face model or an `nn.Module` that follows the arx
decoder protocol (arx.export.protocol). Anything else fails with one line saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arx.errors import ArxError
from arx.export.families import Family, family_for_model_type

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedSource:
    path: Path
    module: Any  # torch.nn.Module in eval mode, float32
    kind: str  # "hf" | "protocol"
    family: Family | None  # for "hf"
    tokenizer_dir: Path | None  # folder holding tokenizer files, when there are any
    generation_config: dict


def check_source_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ArxError(f"{path} does not exist; give a Hugging Face checkpoint folder or a model.pt file")
    return path


def load_source(path: str | Path) -> LoadedSource:
    path = check_source_path(path)
    if path.is_dir():
        return _load_hf_folder(path)
    return _load_pickle(path)


def _load_hf_folder(path: Path) -> LoadedSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ArxError(f"{path} is a folder without config.json, so not a Hugging Face checkpoint; "
                       f"point arx at the folder save_pretrained wrote, or at a model.pt file")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArxError(f"{config_file} is not valid JSON ({e}); re-save the checkpoint") from e
    family = family_for_model_type(model_type)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ArxError(f"{path} has no weights (*.safetensors or *.bin); re-save it with save_pretrained")
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers/safetensors raise many types for a broken checkpoint
        raise ArxError(f"could not load the checkpoint in {path} ({type(e).__name__}: "
                       f"{_first_line(e)}); the weights look corrupt or incomplete, re-download "
                       f"or re-save them") from e
    return LoadedSource(path, model.eval(), "hf", family,
                        path if _has_tokenizer(path) else None, _generation_config(model))


def _load_pickle(path: Path) -> LoadedSource:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling arbitrary bytes can raise anything, MemoryError included
        raise ArxError(f"{path} is not a readable torch.save file ({type(e).__name__}: "
                       f"{_first_line(e)}); give a model.pt written by torch.save(model) or a "
                       f"Hugging Face checkpoint folder") from e
    if not isinstance(obj, torch.nn.Module):
        hint = " (a state dict: load it into its model and torch.save the model)" if isinstance(obj, dict) else ""
        raise ArxError(f"{path} holds a {type(obj).__name__}, not an nn.Module{hint}; "
                       f"torch.save the whole model")
    module = obj.float().eval()
    tok_dir = path.parent if _has_tokenizer(path.parent) else None
    config = getattr(module, "config", None)
    if config is not None and hasattr(module, "generate"):  # a pickled Hugging Face model
        family = family_for_model_type(getattr(config, "model_type", None))
        return LoadedSource(path, module, "hf", family, tok_dir, _generation_config(module))
    from arx.export.protocol import check_protocol

    check_protocol(module, path)
    return LoadedSource(path, module, "protocol", None, tok_dir, {})


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _generation_config(model) -> dict:
    gc = getattr(model, "generation_config", None)
    return gc.to_dict() if gc is not None else {}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no message"
