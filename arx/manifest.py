"""The bundle manifest (`arx.json`): the one contract between stages.

Every consumer derives its IO from here: ONNX dynamic axes at export, ORT feeds and the KV
buffers in the runtime, TensorRT optimization profiles in `arx build`. Nothing re-types names.
The manifest is plain JSON so that a device with only numpy can read it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arx.errors import ArxError

FORMAT = "arx-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "arx.json"

# KV update modes of a decoder stage.
#  in_place: past and present are the same preallocated (B, kv_heads, max_seq_len, head_dim)
#            buffer; the attention op writes the new tokens at each sequence's length.
#  concat:   present = concat(past, new) along the sequence axis (custom protocol modules).
KV_UPDATE_MODES = ("in_place", "concat")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Dims are ints or symbolic names (strings)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class KVLayout:
    """Shape of the cache: per layer one key and one value tensor (B, kv_heads, S, head_dim)."""

    layers: int
    kv_heads: int
    head_dim: int
    max_seq_len: int
    dtype: str = "float32"
    update: str = "in_place"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"

    def __post_init__(self):
        if self.update not in KV_UPDATE_MODES:
            raise ArxError(f"unknown KV update mode {self.update!r}; known: {', '.join(KV_UPDATE_MODES)}")

    def pairs(self) -> list[tuple[str, str]]:
        """(past input, present output) names, keys and values for every layer in order."""
        out = []
        for i in range(self.layers):
            out.append((self.past_key.format(i=i), self.present_key.format(i=i)))
            out.append((self.past_value.format(i=i), self.present_value.format(i=i)))
        return out


@dataclass(frozen=True)
class Stage:
    """One ONNX graph of the bundle and its IO."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Stage":
        return cls(d["file"], tuple(map(TensorSpec.from_json, d["inputs"])),
                   tuple(map(TensorSpec.from_json, d["outputs"])))


@dataclass(frozen=True)
class TokenizerInfo:
    file: str | None  # tokenizer.json, or None when the model came without one
    onnx_file: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos: bool = False
    onnx_skipped_reason: str | None = None  # why tokenizer.onnx is absent, when it is
    onnx_caveats: tuple[str, ...] = ()  # known differences of tokenizer.onnx (e.g. no NFC)


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False


@dataclass
class Manifest:
    family: str
    vocab_size: int
    kv: KVLayout
    stages: dict[str, Stage]
    tokenizer: TokenizerInfo
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    model: dict[str, Any] = field(default_factory=dict)  # source, parameter count, dims
    provenance: dict[str, Any] = field(default_factory=dict)  # tool versions, date
    parity: dict[str, Any] = field(default_factory=dict)  # measured error vs PyTorch
    # Free-form sections owned by later stages (calibration, builds, reports): they add keys
    # here rather than changing the fields above, so older readers still load newer bundles.
    extensions: dict[str, Any] = field(default_factory=dict)

    @property
    def decoder(self) -> Stage:
        return self.stages["decoder"]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "vocab_size": self.vocab_size,
            "kv": dataclasses.asdict(self.kv),
            "stages": {k: s.to_json() for k, s in self.stages.items()},
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "generation": dataclasses.asdict(self.generation),
            "model": self.model,
            "provenance": self.provenance,
            "parity": self.parity,
            **self.extensions,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ArxError("this is not an arx bundle manifest (no 'format: arx-bundle'); "
                           "make a bundle with: arx export MODEL -o NAME.arx")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise ArxError(f"bundle format version {d['format_version']} is newer than this arx "
                           f"understands ({FORMAT_VERSION}); upgrade arx")
        known = {"format", "format_version", "family", "vocab_size", "kv", "stages", "tokenizer",
                 "generation", "model", "provenance", "parity"}
        tok = dict(d["tokenizer"])
        tok["eos_token_ids"] = tuple(tok.get("eos_token_ids") or ())
        tok["onnx_caveats"] = tuple(tok.get("onnx_caveats") or ())
        return cls(
            family=d["family"],
            vocab_size=int(d["vocab_size"]),
            kv=KVLayout(**d["kv"]),
            stages={k: Stage.from_json(s) for k, s in d["stages"].items()},
            tokenizer=TokenizerInfo(**tok),
            generation=GenerationDefaults(**d.get("generation", {})),
            model=d.get("model", {}),
            provenance=d.get("provenance", {}),
            parity=d.get("parity", {}),
            extensions={k: v for k, v in d.items() if k not in known},
        )

    def write(self, bundle_dir: Path) -> None:
        text = json.dumps(self.to_json(), indent=2, sort_keys=False)
        (Path(bundle_dir) / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate `arx.json` of a bundle directory."""
    path = Path(bundle_dir)
    if not path.exists():
        raise ArxError(f"bundle {path} does not exist; make one with: arx export MODEL -o {path}")
    if not path.is_dir() or not (path / MANIFEST_NAME).is_file():
        raise ArxError(f"{path} is not an arx bundle (no {MANIFEST_NAME} inside); "
                       f"make one with: arx export MODEL -o NAME.arx")
    try:
        data = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
        return Manifest.from_json(data)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArxError(f"{path / MANIFEST_NAME} is corrupt ({type(e).__name__}: {e}); "
                       f"re-export the bundle") from e
