"""`arx export`: a checkpoint in, a checked bundle out.

    load source ─► read weights ─► emit decoder.onnx ─► tokenizer ─► parity vs PyTorch ─► arx.json

Everything is written into a temp folder that is renamed into place only when every step,
the parity check included, has passed.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import arx
from arx.bundle import atomic_bundle, check_writable_output
from arx.errors import ArxError
from arx.manifest import GenerationDefaults, KVLayout, Manifest, Pipeline, TokenizerInfo
from arx.progress import Steps
from arx.export.sources import LoadedSource, check_source_path, load_source

DEFAULT_MAX_SEQ_LEN = 4096
BUNDLE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype


@dataclass(frozen=True)
class ExportOptions:
    max_seq_len: int | None = None  # None: the model's max positions, capped at 4096
    atol: float | None = None  # None: the family's default tolerance on logits
    check_parity: bool = True
    parity_decode_steps: int = 4
    overwrite: bool = False
    progress: bool = True
    seed: int = 0
    inputs_embeds: bool = False  # decoder takes (B, S, hidden) embeddings + an embedder stage
    moe: str | None = None  # op | dense (--moe); None: op where ORT's MoE op fits (moe_graph.py)
    kv_dtype: str = "fp32"  # fp16 | int8: the cache is retyped after parity (export/kv_dtype.py)
    dtype: str = "float32"  # the decoder's weights and activations (--dtype); the cache follows
    num_layers: int | None = None  # the first N layers only: parity's truncated-depth check
    vocab_rows: int | None = None  # with num_layers: the first N vocabulary rows only (ditto)
    quantize: object = None  # CalibrateOptions: --quantize w8|w4 (export/quantized_export.py)

    def __post_init__(self):
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ArxError(f"--max-seq-len must be >= 2 (got {self.max_seq_len})")
        if self.atol is not None and not self.atol > 0:
            raise ArxError(f"--atol must be > 0 (got {self.atol})")
        if self.parity_decode_steps < 1:
            raise ArxError("parity needs at least one decode step")
        if self.dtype not in BUNDLE_DTYPES.values():
            raise ArxError(f"--dtype must be one of {', '.join(BUNDLE_DTYPES)} (got {self.dtype})")
        if self.dtype != "float32" and self.inputs_embeds:
            raise ArxError("--inputs-embeds takes float32 embeddings: export it without --dtype "
                           "(fp32)")
        if self.kv_dtype != "fp32" and self.dtype != "float32":  # before minutes of export
            raise ArxError(f"--kv-dtype rewrites an fp32 export's cache; a --dtype export's cache "
                           f"follows its weights ({self.dtype}): drop --kv-dtype or --dtype")
        if self.quantize is not None:
            from arx.export.quantized_export import check_request

            check_request(self.quantize, self)


def export_model(*, source: str | Path, output: str | Path,
                 options: ExportOptions = ExportOptions()) -> Manifest:
    output = Path(output)
    check_source_path(source)  # both checks before minutes of work
    check_writable_output(output, overwrite=options.overwrite)
    steps = Steps(5 if options.quantize is None else 6, enabled=options.progress)
    with steps.step(f"loading {source}"):
        src = load_source(source, options.num_layers, options.vocab_rows)
    if options.quantize is not None and src.kind != "hf":
        raise ArxError("--quantize is for Hugging Face checkpoint folders; export this source "
                       "without it, then run arx calibrate --scheme w4|w8")
    if src.kind == "hf":  # before anything is read or written: one line if it cannot fit
        from arx.export.budget import check_fits

        check_fits(src, output, options.dtype, options.check_parity, options.quantize)
    with atomic_bundle(output, overwrite=options.overwrite) as tmp:
        decoder = _emit_decoder(src, tmp, options, steps)
        with steps.step("exporting the tokenizer"):
            tokenizer = _export_tokenizer(src, tmp)
        space = decoder.pipeline.token_space
        stage = dataclasses.replace(decoder.stage, kv=decoder.kv, token_space=space)
        manifest = Manifest(
            family=decoder.family, vocab_size=decoder.vocab_size,
            stages={"decoder": stage, **_shared_kv(decoder.extra_stages, decoder.kv, space),
                    **decoder.plain_stages}, token_spaces=dict(decoder.token_spaces),
            tokenizer=tokenizer, generation=_generation_defaults(src), model=decoder.model_info,
            provenance=_provenance(src), extensions=dict(decoder.extensions),
            pipeline=decoder.pipeline)
        manifest.write(tmp)
        with steps.step("checking parity against PyTorch (prefill + decode)"):
            if options.check_parity and decoder.parity is not None:  # its own pipeline
                manifest.parity = decoder.parity(tmp, manifest, options)
            elif options.check_parity:
                manifest.parity = _parity(src, tmp, manifest, decoder, options)
            else:
                manifest.parity = {"passed": None, "skipped": "--no-parity"}
        if options.quantize is not None:  # the gate: nothing is written over it
            from arx.export.quantized_export import finish

            with steps.step("evaluating against the unquantized model"):
                manifest = finish(src, tmp, manifest, options)
        with steps.step(f"writing {output}"):
            if options.kv_dtype != "fp32":  # parity above ran on the fp32 cache
                from arx.export.kv_dtype import convert_export

                manifest = convert_export(tmp, manifest, options.kv_dtype, options.seed)
            manifest.write(tmp)
    return manifest


def _emit_decoder(src: LoadedSource, tmp: Path, options: ExportOptions, steps: Steps):
    """The source kind's emitter (Hugging Face, Janus, or a traced protocol module: plain,
    image-token or next-scale) -> its DecoderExport."""
    if src.kind == "hf":
        from arx.export.hf_decoder import export_hf_decoder

        with steps.step("emitting decoder.onnx"):
            return export_hf_decoder(src, tmp, options)
    if src.kind == "janus":
        from arx.export.janus import export_janus

        with steps.step("emitting the Janus decoder, image embedder and VQ decoder"):
            return export_janus(src, tmp, options)
    if options.inputs_embeds:
        raise ArxError("--inputs-embeds is for Hugging Face checkpoints; a decoder-protocol "
                       "module takes what its forward takes: export it without the flag")
    if options.dtype != "float32":
        raise ArxError("--dtype is for Hugging Face checkpoints; a decoder-protocol module "
                       "exports as traced (float32): export it without --dtype")
    from arx.export.image_protocol import export_image_decoder, image_spec
    from arx.export.protocol import export_protocol_decoder
    from arx.export.var_protocol import export_var, var_spec

    # an image-token module (arx_image) adds its VQ decoder stage and pipeline, a next-scale
    # one (arx_var) its class, next-input and VQ stages
    export = export_var if var_spec(src.module) else \
        export_image_decoder if image_spec(src.module) else export_protocol_decoder
    with steps.step("tracing the decoder-protocol module to decoder.onnx"):
        return export(src, tmp, options)


@dataclass
class DecoderExport:
    """What a decoder emitter hands back to the pipeline."""

    family: str
    vocab_size: int
    kv: KVLayout
    stage: object  # arx.manifest.Stage
    model_info: dict
    atol: float
    extra_stages: dict = dataclasses.field(default_factory=dict)  # name -> Stage (decoder_step)
    extensions: dict = dataclasses.field(default_factory=dict)  # manifest sections they need
    plain_stages: dict = dataclasses.field(default_factory=dict)  # stages without a KV (embedder)
    pipeline: Pipeline = dataclasses.field(default_factory=Pipeline)
    token_spaces: dict = dataclasses.field(default_factory=dict)  # {}: the text vocabulary
    parity: object = None  # (bundle, manifest, options) -> report where id steps cannot drive it
    reference: object = None  # parity's ReferenceStep where the source kind's default is wrong


def _shared_kv(stages: dict, kv: KVLayout, space: str) -> dict:
    """Extra decoder stages (decoder_step) run on the decoder's own cache: same KV layout."""
    return {k: dataclasses.replace(s, kv=kv, token_space=space) for k, s in stages.items()}


def resolve_max_seq_len(options: ExportOptions, model_max: int | None) -> int:
    if options.max_seq_len is not None:
        if model_max and options.max_seq_len > model_max:
            raise ArxError(f"--max-seq-len {options.max_seq_len} exceeds the model's "
                           f"{model_max} positions; use at most {model_max}")
        return options.max_seq_len
    return min(model_max or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)


def _parity(src: LoadedSource, bundle: Path, manifest: Manifest, decoder: DecoderExport,
            options: ExportOptions) -> dict:
    from arx.export.parity_run import run_parity  # reference first, then the bundle

    return run_parity(src, bundle, manifest, decoder, options)


def _export_tokenizer(src: LoadedSource, bundle: Path) -> TokenizerInfo:
    gen = src.generation_config
    eos = gen.get("eos_token_id")
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if src.tokenizer_dir is None:
        return TokenizerInfo(file=None, bos_token_id=gen.get("bos_token_id"),
                             eos_token_ids=eos_ids, pad_token_id=gen.get("pad_token_id"))
    from arx.export.tokenizer import export_tokenizer

    info = export_tokenizer(src.tokenizer_dir, bundle).info()
    return dataclasses.replace(info, eos_token_ids=info.eos_token_ids or eos_ids)


def _generation_defaults(src: LoadedSource) -> GenerationDefaults:
    g = src.generation_config
    return GenerationDefaults(
        max_new_tokens=int(g.get("max_new_tokens") or 64),
        temperature=float(g.get("temperature") or 1.0),
        top_k=int(g.get("top_k") or 0),
        top_p=float(g.get("top_p") or 1.0),
        repetition_penalty=float(g.get("repetition_penalty") or 1.0),
        do_sample=bool(g.get("do_sample", False)),
    )


def _provenance(src: LoadedSource) -> dict:
    import onnx
    import onnxruntime
    import torch

    info = {"arx": arx.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "source": str(src.path),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info
