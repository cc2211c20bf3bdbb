"""Load what the user points `arx export` at into a torch module plus its description.

Accepted: a Hugging Face causal-LM folder (config.json + safetensors/bin weights), a
`torch.save(model)` file holding a Hugging Face model or an `nn.Module` that follows the arx
decoder protocol (arx.export.protocol), or a `torch.export.save` program that follows it
(arx.export.program). TorchScript and anything else fail with one line saying what to do.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arx.errors import ArxError
from arx.export.families import Family, family_for_model_type
from arx.export.torch_output import error_summary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedSource:
    path: Path
    module: Any  # torch.nn.Module in eval mode, float32 (on the meta device when streamed)
    kind: str  # "hf" | "protocol" | "janus" (export/janus.py)
    family: Family | None  # for "hf"; for "janus" its language model's
    tokenizer_dir: Path | None  # folder holding tokenizer files, when there are any
    generation_config: dict
    program: Any = None  # the torch.export ExportedProgram a model.pt2 held; module is its .module()
    tensors: Any = None  # "hf": the TensorSource (export/tensor_source.py) the weights come from
    streamed: bool = False  # module has no weights (meta device): tensors come from the files
    num_layers: int | None = None  # streamed: only the first N layers (parity's truncated check)
    vocab_rows: int | None = None  # streamed: only the first N vocabulary rows (ditto)

    def torch_module(self, dtype=None):
        """The module with its weights, for the PyTorch reference: loaded from the folder
        (in `dtype`, default float32) when the export itself streamed the files."""
        if not self.streamed:
            return self.module
        model = _from_pretrained(self.path, dtype, self.num_layers)
        if self.vocab_rows is not None:  # the first rows, as the export read them (FirstRows)
            model.resize_token_embeddings(self.vocab_rows, mean_resizing=False)
        return model


def check_source_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ArxError(f"{path} does not exist; give a Hugging Face checkpoint folder or a model.pt file")
    return path


def load_source(path: str | Path, num_layers: int | None = None,
                vocab_rows: int | None = None) -> LoadedSource:
    """num_layers, vocab_rows: a Hugging Face folder's first N layers and first V vocabulary
    rows only (read from the same files; parity's truncated check of a streamed export)."""
    path = check_source_path(path)
    if path.is_dir():
        return _load_hf_folder(path, num_layers, vocab_rows)
    kind = _archive_kind(path)
    if kind == "torchscript":
        raise ArxError(f"{path} is a TorchScript archive (torch.jit.save); TorchScript is not "
                       f"supported: give torch.save(model) of the nn.Module, or its "
                       f"torch.export.save program (see 'Model sources' in the README)")
    if kind == "pt2":
        from arx.export.program import load_program

        return load_program(path)
    return _load_pickle(path)


def _archive_kind(path: Path) -> str | None:
    """"pt2" (torch.export.save), "torchscript" (torch.jit.save) or None, read without unpickling.

    Both are zip archives under one root folder; torch tells them apart by the same records.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            records = {n.split("/", 1)[-1]: n for n in archive.namelist()}
            if "archive_format" in records and archive.read(records["archive_format"]).strip() == b"pt2":
                return "pt2"
            return "torchscript" if "constants.pkl" in records else None
    except (zipfile.BadZipFile, OSError):  # not a zip: a legacy torch.save or not a model at all
        return None


def _load_hf_folder(path: Path, num_layers: int | None = None,
                    vocab_rows: int | None = None) -> LoadedSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ArxError(f"{path} is a folder without config.json, so not a Hugging Face checkpoint; "
                       f"point arx at the folder save_pretrained wrote, or at a model.pt file")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArxError(f"{config_file} is not valid JSON ({e}); re-save the checkpoint") from e
    family = None if model_type == "janus" else family_for_model_type(model_type)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ArxError(f"{path} has no weights (*.safetensors or *.bin); re-save it with save_pretrained")
    if family is None:  # text-to-image: its own loader and bundle (export/janus.py)
        from arx.export.janus import load_janus_folder

        return load_janus_folder(path, path if has_tokenizer(path) else None)
    tok_dir = path if has_tokenizer(path) else None
    if any(path.glob("*.safetensors")):
        from arx.export.tensor_source import FirstRows, SafetensorsSource, matches_model

        tensors = SafetensorsSource(path)
        model = _config_only_model(path, num_layers)
        if matches_model(tensors, model):  # read tensor by tensor, never the model whole
            vocab = model.config.get_text_config().vocab_size
            sliced = _config_only_model(path, num_layers, vocab_rows) if vocab_rows else None
            if sliced is not None and sliced.config.get_text_config().vocab_size == vocab_rows:
                model, tensors = sliced, FirstRows(tensors, vocab, vocab_rows)
            else:  # a config whose vocabulary the override does not reach: all of it
                vocab_rows = None
            return LoadedSource(path, model, "hf", family, tok_dir, _folder_generation_config(
                path, model.config), tensors=tensors, streamed=True, num_layers=num_layers,
                vocab_rows=vocab_rows)
    from arx.export.tensor_source import StateDictSource

    model = _from_pretrained(path)  # *.bin, or tensor names of another layout: transformers maps
    return LoadedSource(path, model, "hf", family, tok_dir, _generation_config(model),
                        tensors=StateDictSource(model.state_dict()))


def _depth(num_layers: int | None, vocab_rows: int | None = None) -> dict:
    """config overrides: the first N layers, the first V vocabulary rows."""
    return {**({} if num_layers is None else {"num_hidden_layers": num_layers}),
            **({} if vocab_rows is None else {"vocab_size": vocab_rows})}


def _from_pretrained(path: Path, dtype=None, num_layers: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar would split arx's own progress line
    level = hf_logging.get_verbosity()
    if num_layers is not None:  # the layers left out are "unused weights": expected here
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                     **_depth(num_layers))
    except Exception as e:  # transformers/safetensors raise many types for a broken checkpoint
        raise ArxError(f"could not load the checkpoint in {path} ({error_summary(e)}); "
                       f"the weights look corrupt or incomplete, re-download "
                       f"or re-save them") from e
    finally:
        hf_logging.set_verbosity(level)
    return model.eval()


def _config_only_model(path: Path, num_layers: int | None = None, vocab_rows: int | None = None):
    """The model built from config.json on the meta device: its modules, parameter names and
    counts, no weights (the RoPE tables are made by its rotary class, export/hf_decoder.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, **_depth(num_layers, vocab_rows))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config).eval()
    except Exception as e:  # transformers raises many types for a config it cannot use
        raise ArxError(f"could not build the model of {path / 'config.json'} "
                       f"({error_summary(e)}); check the config or transformers' version") from e


def _load_pickle(path: Path) -> LoadedSource:
    import torch

    try:
        with _importable_from(path.parent):
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:  # the pickle names a class to import
        if (why := _unimportable_class(path, e)) is None:
            raise ArxError(f"{path} could not be loaded ({error_summary(e)}); the code that "
                           f"defines the model must be importable") from e
        raise ArxError(why) from e
    except Exception as e:  # unpickling arbitrary bytes can raise anything, MemoryError included
        raise ArxError(f"{path} is not a readable torch.save file ({error_summary(e)}); give a "
                       f"model.pt written by torch.save(model) or a Hugging Face checkpoint "
                       f"folder") from e
    if not isinstance(obj, torch.nn.Module):
        hint = " (a state dict: load it into its model and torch.save the model)" if isinstance(obj, dict) else ""
        raise ArxError(f"{path} holds a {type(obj).__name__}, not an nn.Module{hint}; "
                       f"torch.save the whole model")
    module = obj.float().eval()
    tok_dir = path.parent if has_tokenizer(path.parent) else None
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "model_type", None) == "janus":
        from arx.export.janus import janus_source

        return janus_source(path, module, tok_dir)
    if config is not None and hasattr(module, "generate"):  # a pickled Hugging Face model
        from arx.export.tensor_source import StateDictSource

        family = family_for_model_type(getattr(config, "model_type", None))
        return LoadedSource(path, module, "hf", family, tok_dir, _generation_config(module),
                            tensors=StateDictSource(module.state_dict()))
    from arx.export.protocol import check_protocol

    check_protocol(module, path)
    return LoadedSource(path, module, "protocol", None, tok_dir, {})


@contextlib.contextmanager
def _importable_from(folder: Path):
    """The model file's folder on the import path while it loads: a pickle holds the class's
    module name only, and that module (the user's mymodel.py) usually sits next to the file.
    Appended, so it never shadows an installed package."""
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.append(entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _unimportable_class(path: Path, e: Exception) -> str | None:
    """Why the pickled model's class cannot be imported, and how to fix it; None if not that."""
    folder = path.parent
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        return (f"{path} needs the Python module '{e.name}' (the model's code, or a package it "
                f"imports), which cannot be imported; if it is your code, put {top}.py (or the "
                f"{top}/ package) in {folder} or add its folder to PYTHONPATH, otherwise pip "
                f"install it")
    found = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(e))
    if not found:
        return None
    name, module = found.groups()
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # `python -m` renames it
    if module in ("__main__", getattr(main_spec, "name", "__main__")):
        return (f"{path} holds a {name} defined in the script that saved it (__main__), which "
                f"cannot be imported here; move the class into a module (e.g. {folder}/mymodel.py), "
                f"import it from there, and torch.save the model again")
    return (f"{path} holds a {module}.{name}, but module '{module}' has no {name} (renamed or "
            f"moved since saving); restore it there or torch.save the model again")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _folder_generation_config(path: Path, config) -> dict:
    """What from_pretrained would set as model.generation_config, without loading weights."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(path).to_dict()
    return GenerationConfig.from_model_config(config).to_dict()


def _generation_config(model) -> dict:
    gc = getattr(model, "generation_config", None)
    return gc.to_dict() if gc is not None else {}

