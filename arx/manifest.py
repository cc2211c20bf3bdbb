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
FORMAT_VERSION = 2  # 2: stages with their own KV layout, token spaces, pipeline, builds
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
    # int8 caches: "per_channel", a static symmetric scale per layer, kv head and head channel
    # for keys and for values (initializers "<past name>.scale", (kv_heads, 1, head_dim)), as
    # GroupQueryAttention's quantized cache reads it; "none" for float caches
    scales: str = "none"
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
    """One ONNX graph of the bundle: its file, IO, its own KV cache (when it has one) and the
    token space its ids live in (`input_ids`/`logits` of a decoder: "text", "image", ...)."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kv: KVLayout | None = None
    token_space: str | None = None

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def to_json(self) -> dict[str, Any]:
        d = {"file": self.file, "inputs": [t.to_json() for t in self.inputs],
             "outputs": [t.to_json() for t in self.outputs]}
        if self.kv is not None:
            d["kv"] = dataclasses.asdict(self.kv)
        if self.token_space is not None:
            d["token_space"] = self.token_space
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Stage":
        return cls(d["file"], tuple(map(TensorSpec.from_json, d["inputs"])),
                   tuple(map(TensorSpec.from_json, d["outputs"])),
                   KVLayout(**d["kv"]) if d.get("kv") else None, d.get("token_space"))


@dataclass(frozen=True)
class TokenSpace:
    """What a stage's ids mean: "text" (a tokenizer's vocabulary) or "codebook" (VQ indices)."""

    kind: str
    size: int
    shape: tuple[int, ...] = ()  # a codebook's token grid per output (e.g. (24, 24)), if fixed

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "shape": list(self.shape)}


@dataclass(frozen=True)
class PipelineStep:
    """A stage run after the loop, fed with what an earlier stage or the loop produced."""

    stage: str
    inputs: dict[str, str]  # this stage's input -> "loop.tokens" | "<stage>.<output>"


@dataclass(frozen=True)
class Pipeline:
    """How the stages connect: the loop steps `loop`, samples `samples` (an output of it) into
    ids of `token_space`, and feeds them back as `feedback` (through the `embed` stage, ids ->
    the feedback input, when the loop stage takes embeddings); `then` runs after the loop."""

    kind: str = "text-generation"
    loop: str = "decoder"
    samples: str = "logits"
    token_space: str = "text"
    feedback: str = "input_ids"
    then: tuple[PipelineStep, ...] = ()
    embed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "loop": self.loop, "samples": self.samples,
                "token_space": self.token_space, "feedback": self.feedback, "embed": self.embed,
                "then": [{"stage": t.stage, "inputs": dict(t.inputs)} for t in self.then]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Pipeline":
        then = tuple(PipelineStep(t["stage"], dict(t["inputs"])) for t in d.get("then", ()))
        return cls(d["kind"], d["loop"], d["samples"], d["token_space"], d["feedback"], then,
                   d.get("embed"))

    def check(self, stages: dict[str, Stage], spaces: dict[str, TokenSpace]) -> None:
        """Every name the pipeline uses exists (a hand-edited or half-written manifest fails)."""
        loop = stages.get(self.loop)
        problems = []
        if loop is None:
            problems.append(f"loop stage {self.loop!r} is not among the stages")
        elif loop.output(self.samples) is None or loop.input(self.feedback) is None:
            problems.append(f"stage {self.loop!r} lacks output {self.samples!r} or input "
                            f"{self.feedback!r}")
        if self.token_space not in spaces:
            problems.append(f"token space {self.token_space!r} is not declared")
        problems += [f"stage {t.stage!r} is not among the stages" for t in self.then
                     if t.stage not in stages]
        embed = stages.get(self.embed) if self.embed else None
        if self.embed and (embed is None or embed.output(self.feedback) is None):
            problems.append(f"embed stage {self.embed!r} is missing or has no output "
                            f"{self.feedback!r}")
        if problems:
            raise ArxError(f"the bundle's pipeline is inconsistent ({'; '.join(problems)}); "
                           f"re-export the bundle")


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
    """The bundle: its stages (each with its own IO and KV layout), the token spaces their ids
    live in, and the pipeline that connects them. A text model is a one-stage pipeline."""

    family: str
    vocab_size: int  # the text vocabulary (token space "text")
    stages: dict[str, Stage]
    tokenizer: TokenizerInfo
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    model: dict[str, Any] = field(default_factory=dict)  # source, parameter count, dims
    provenance: dict[str, Any] = field(default_factory=dict)  # tool versions, date
    parity: dict[str, Any] = field(default_factory=dict)  # measured error vs PyTorch
    pipeline: Pipeline = field(default_factory=Pipeline)
    token_spaces: dict[str, TokenSpace] = field(default_factory=dict)  # default: {"text": V}
    # TensorRT builds by target: kind, path, precision, limits and the engine's IO (`io`)
    builds: dict[str, Any] = field(default_factory=dict)
    # Sections owned by later stages (quantization, reports): they add keys here rather than
    # changing the fields above, so older readers still load newer bundles.
    extensions: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.token_spaces:
            self.token_spaces = {"text": TokenSpace("text", self.vocab_size)}
        self.pipeline.check(self.stages, self.token_spaces)

    @property
    def decoder(self) -> Stage:
        return self.stages[self.pipeline.loop]

    @property
    def kv(self) -> KVLayout:
        """The KV layout of the stage the loop steps."""
        kv = self.decoder.kv
        if kv is None:
            raise ArxError(f"stage {self.pipeline.loop!r} has no KV layout; re-export the bundle")
        return kv

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "vocab_size": self.vocab_size,
            "token_spaces": {k: t.to_json() for k, t in self.token_spaces.items()},
            "stages": {k: s.to_json() for k, s in self.stages.items()},
            "pipeline": self.pipeline.to_json(),
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "generation": dataclasses.asdict(self.generation),
            "model": self.model,
            "provenance": self.provenance,
            "parity": self.parity,
            "builds": self.builds,
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
        if d.get("format_version", 0) < FORMAT_VERSION:
            d = _upgrade_v1(d)
        known = {"format", "format_version", "family", "vocab_size", "token_spaces", "stages",
                 "pipeline", "tokenizer", "generation", "model", "provenance", "parity", "builds"}
        tok = dict(d["tokenizer"])
        tok["eos_token_ids"] = tuple(tok.get("eos_token_ids") or ())
        tok["onnx_caveats"] = tuple(tok.get("onnx_caveats") or ())
        spaces = {k: TokenSpace(t["kind"], int(t["size"]), tuple(t.get("shape") or ()))
                  for k, t in d["token_spaces"].items()}
        return cls(
            family=d["family"],
            vocab_size=int(d["vocab_size"]),
            stages={k: Stage.from_json(s) for k, s in d["stages"].items()},
            tokenizer=TokenizerInfo(**tok),
            generation=GenerationDefaults(**d.get("generation", {})),
            model=d.get("model", {}),
            provenance=d.get("provenance", {}),
            parity=d.get("parity", {}),
            pipeline=Pipeline.from_json(d["pipeline"]),
            token_spaces=spaces,
            builds=d.get("builds", {}),
            extensions={k: v for k, v in d.items() if k not in known},
        )

    def write(self, bundle_dir: Path) -> None:
        text = json.dumps(self.to_json(), indent=2, sort_keys=False)
        (Path(bundle_dir) / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (one decoder stage, top-level `kv`) read as the one-stage text pipeline it is.
    Its builds recorded no engine IO; `arx generate --engine` asks for a rebuild."""
    d = dict(d)
    stages = {k: dict(s) for k, s in d["stages"].items()}
    stages["decoder"].update(kv=d.pop("kv"), token_space="text")
    d["stages"] = stages
    d["token_spaces"] = {"text": {"kind": "text", "size": d["vocab_size"]}}
    d["pipeline"] = Pipeline().to_json()
    return d


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
