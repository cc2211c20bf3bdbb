"""Parity at export, run so that a big model fits: the PyTorch reference first, then the bundle.

The streamed export never loads the model with its weights; parity does, once, after the
bundle is written: the reference runs every step of the plan (export/parity.py) with the
model loaded from the checkpoint, its outputs (logits and keys of a few tokens) are kept, the
model is freed, and only then does ONNX Runtime open the bundle (without prepacked weight
copies). Peak memory is the larger of the two, not their sum.

- fp32 bundles: the reference in float32, the whole depth.
- fp16 bundles: the reference in the checkpoint's dtype (a float32 copy would be twice the
  checkpoint), the tolerance relative to the logits' scale.
- Where the whole depth does not fit the export's memory budget (ORT CPU keeps fp32 copies of
  fp16 weights: ~3x the bundle), or for bf16 bundles without CUDA (ORT's CPU provider has no
  bfloat16 MatMul), the first TRUNCATED_LAYERS layers and the first TRUNCATED_VOCAB rows of the
  vocabulary (embedding and head) are exported the same way from the same files (bf16: in
  fp32) and checked with a float32 reference cut the same way (resize_token_embeddings keeps
  the first rows).

The manifest says what was compared: `parity.reference` (dtype, layers) and `parity.depth`.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from arx.manifest import Manifest

GB = 1 << 30
PROCESS_BYTES = GB // 2  # torch, transformers and onnxruntime imported
TRUNCATED_LAYERS = 2
# ... and the first TRUNCATED_VOCAB rows of the embedding and LM head: the layers' code and the
# head's are what the check checks, and a 128k-row head would be most of its time (ORT CPU
# casts an fp16 head to fp32 at every step of the low-memory session)
TRUNCATED_VOCAB = 8192
BF16_CPU = ("onnxruntime's CPU provider has no bfloat16 MatMul and this machine has no CUDA "
            "provider: the same export in float32 was checked instead")
QUANTIZED = ("the bundle is quantized (--quantize): its accuracy against the unquantized model "
             "is the gate's report; this float export of the first layers checks the emitter")
# max abs error on logits as a fraction of max |logit|, by the bundle's or reference's dtype
RELATIVE_ATOL = {"float16": 2e-2, "bfloat16": 5e-2}


def run_parity(src, bundle: Path, manifest: Manifest, decoder, options) -> dict:
    """The manifest's parity section; raises ArxError (nothing written) when over tolerance."""
    from arx.export.parity import (compare_outputs, parity_plan, raise_if_failed,
                                   reference_outputs, step_width)
    from arx.runtime.backend import BackendOptions
    from arx.runtime.decoder import STEP_GRAPH, DecoderSession

    dtype = manifest.model.get("dtype", "float32")
    device = "cuda" if dtype == "bfloat16" and _has_cuda() else "cpu"
    why = QUANTIZED if options.quantize else truncate_reason(src, bundle, manifest, device)
    if why:
        return truncated_parity(src, manifest, options, why)
    kv = manifest.kv
    n = min(7, max(2, kv.max_seq_len - options.parity_decode_steps))
    # concat-mode graphs have no per-sequence lengths: their batches share one length
    lengths = (n, max(1, n - 3)) if kv.update == "in_place" else (n, n)
    general = kv.update == "in_place" and STEP_GRAPH in manifest.extensions
    plan = parity_plan(vocab_size=manifest.vocab_size, prompt_lengths=lengths,
                       decode_steps=options.parity_decode_steps, seed=options.seed,
                       step_width=step_width(lengths, options.parity_decode_steps, general,
                                             kv.max_seq_len))
    reference, compared = _reference(src, decoder, dtype)
    refs = reference_outputs(reference, plan)
    del reference  # the model goes with it: ORT opens the bundle only after
    gc.collect()
    atol = options.atol or tolerance(decoder.atol, dtype, compared.get("dtype"), refs)
    with DecoderSession(bundle, BackendOptions(device=device, low_memory=True), manifest=manifest) as session:
        report = compare_outputs(session, plan, refs, atol=atol)
    raise_if_failed(report, "nothing was written")
    return {**report.to_json(), "dtype": dtype, "reference": compared}


def truncate_reason(src, bundle: Path, manifest: Manifest, device: str) -> str | None:
    """Why parity runs on the first TRUNCATED_LAYERS layers instead of the whole bundle, or
    None: a bf16 bundle without CUDA (nothing on the CPU runs it), or a streamed export whose
    full-depth check would need more memory than the export's own budget."""
    dtype = manifest.model.get("dtype", "float32")
    if not src.streamed or src.num_layers is not None:
        return None
    if device == "cpu" and dtype == "bfloat16":
        return BF16_CPU
    data = sum(f.stat().st_size for f in Path(bundle).glob("*.data"))
    need = full_depth_bytes(src.tensors.nbytes(), data, manifest.model.get("parameters", 0),
                            dtype, device)
    budget = memory_budget(src.tensors.nbytes(), data)
    if need <= budget:
        return None
    return (f"a full-depth check would need about {need / GB:.1f} GB, over this export's "
            f"budget of {budget / GB:.1f} GB")


def memory_budget(checkpoint_bytes: int, bundle_bytes: int) -> float:
    """What a streamed export may hold at its peak: 1.5x the larger of checkpoint and bundle,
    + 1 GB (issue 15's figure; tests/export/test_streamed_export.py measures it)."""
    return 1.5 * max(checkpoint_bytes, bundle_bytes) + GB


def full_depth_bytes(checkpoint_bytes: int, data_bytes: int, params: int, dtype: str,
                     device: str) -> float:
    """Peak of the full-depth check: the process (torch, ORT), then the larger of the
    reference and one ORT session (it maps the data file; on the CPU it keeps fp32 copies of
    fp16 weights). A float32 reference of a half-precision checkpoint holds the checkpoint's
    mapped pages while it upcasts (the 1B shape's fp32 export: 7.47 GB = process + fp32 model
    + checkpoint); a reference in the checkpoint's own dtype holds it once (the 1B w4 export's
    bf16 reference: 3.22 GB = process + checkpoint + activations)."""
    ref_bytes = params * 4 + checkpoint_bytes if dtype == "float32" else checkpoint_bytes
    session = data_bytes * (3 if dtype == "float16" and device == "cpu" else 1)
    return PROCESS_BYTES + max(ref_bytes, session)


def truncated_parity(src, manifest: Manifest, options, why: str) -> dict:
    """Export the first TRUNCATED_LAYERS layers the same way (same files, same emitter; fp32
    where the bundle is bf16 and no CUDA runs it) with full parity, and report that check."""
    import dataclasses
    import tempfile

    from arx.export.exporter import export_model

    dtype = manifest.model.get("dtype", "float32")
    depth = min(TRUNCATED_LAYERS, manifest.kv.layers)
    checked = "float32" if why == BF16_CPU else dtype
    rows = TRUNCATED_VOCAB if manifest.vocab_size > TRUNCATED_VOCAB else None
    sub = dataclasses.replace(options, num_layers=depth, vocab_rows=rows, dtype=checked,
                              progress=False, overwrite=True, quantize=None)
    with tempfile.TemporaryDirectory(prefix="arx-parity-") as work:
        result = export_model(source=src.path, output=Path(work) / "truncated.arx", options=sub)
    vocab = result.vocab_size
    return {**result.parity, "dtype": dtype, "depth": {
        "layers": depth, "of": manifest.kv.layers, "vocab": vocab, "of_vocab": manifest.vocab_size,
        "dtype": checked, "why": why}}


def _reference(src, decoder, bundle_dtype: str):
    """(ReferenceStep, what it is): the emitter's own reference where it has one (Janus), the
    Hugging Face model (loaded from the checkpoint when the export streamed it), or the
    decoder-protocol module."""
    import torch

    from arx.export.parity import hf_reference
    from arx.export.protocol import protocol_reference

    if decoder.reference is not None:
        return decoder.reference, {"framework": "torch", "model": "the exporter's reference"}
    if src.kind != "hf":
        return protocol_reference(src.module), {"framework": "torch", "dtype": "float32"}
    dtype = reference_dtype(src, bundle_dtype)
    module = src.torch_module(getattr(torch, dtype))  # streamed: loaded now, freed with it
    layers = getattr(module.config, "num_hidden_layers", None)
    info = {"framework": "torch", "model": type(module).__name__, "dtype": dtype,
            "layers": layers, "loaded": "from the checkpoint after the export, freed before "
                                        "the bundle ran" if src.streamed else "with the source"}
    return hf_reference(module), info


def reference_dtype(src, bundle_dtype: str) -> str:
    """float32, except for a half-precision bundle of a streamed half-precision checkpoint:
    there the reference runs in the checkpoint's own dtype, because a float32 copy of the
    model (twice the checkpoint) would exceed the memory the export itself needs."""
    if bundle_dtype == "float32" or not src.streamed or src.num_layers is not None:
        return "float32"  # (a truncated check is small: its reference can be exact)
    return checkpoint_dtype(src)


def checkpoint_dtype(src) -> str:
    """The torch dtype name a streamed checkpoint is stored in (float32 if mixed or loaded)."""
    if not src.streamed:
        return "float32"
    codes = {src.tensors.dtype(n) for n in src.tensors.keys()}
    return {"BF16": "bfloat16", "F16": "float16"}.get(codes.pop(), "float32") \
        if len(codes) == 1 else "float32"


def tolerance(family_atol: float, dtype: str, ref_dtype: str | None, refs: list[list[tuple]]
              ) -> float:
    """The family's fp32 tolerance, or where the bundle or the reference is half precision a
    fraction of the largest reference logit (their rounding error grows with the logits'
    scale; bf16 keeps 3 fewer bits than fp16)."""
    rel = max(RELATIVE_ATOL.get(dtype, 0.0), RELATIVE_ATOL.get(ref_dtype, 0.0))
    if not rel:
        return family_atol
    scale = max(float(np.max(np.abs(ref))) for call in refs for ref, _ in call)
    return max(family_atol, rel * scale)


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()
