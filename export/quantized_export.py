"""`arx export --quantize w8|w4`: the bundle `arx calibrate --scheme w8|w4` makes, without the
float bundle.

    read weight ─► quantize (ORT's block quantizer, calibrate's settings) ─► decoder.onnx.data
    ... every layer ... ─► tokenizer ─► float parity of the first layers (the emitter)
    ─► PyTorch reference on the text (top-k kept, model freed) ─► the bundle on the same text
    ─► calibrate's report and gate (nothing written over the gate unless --force)

Each linear goes through calibration.weight_only.LinearQuantizer as the graph builder emits it
(export/graph.GraphBuilder.matmul), so the float weights are never all in memory and the blobs
are byte-identical to calibrate's. What export cannot do without a float graph: the per-layer
error and the remedies calibrate measures on a failing gate (both run the float graph), and
w8a8 (its activation ranges are calibrated on the float graph).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest

EXTENSION = "quantization"  # = calibration.calibrator.EXTENSION (imported lazily there)
LM_HEAD = "lm_head"  # = calibration.graph.LM_HEAD
TOP_K = 64  # reference log-probs kept per position for the KL (the rest is one bucket)
# Sequences a forward: the (B, S, V) logits and their log-softmax copies are the largest
# arrays the check holds beside the model (a 128k vocabulary: 65 MB a sequence in fp32).
BATCH = 1  # the bundle's: ORT's int4 prefill is no faster per sequence at 2 (measured)
# PyTorch's bf16 forward is: 0.26-0.28 s a 128-token sequence of the 1B shape at 4 against 0.35
# at 1 (AMX Xeon), for about 0.5 GB more of logits in flight
REFERENCE_BATCH = 4
PER_LAYER_SKIPPED = ("skipped on export (it compares every MatMul against the float graph, "
                     "which arx export --quantize never writes): run arx calibrate for the "
                     "per-layer analysis")


def check_request(copts, options) -> None:
    """One line before any work for what the direct path cannot do."""
    q = copts.quant
    if q.spec.activations:
        raise ArxError(f"--quantize {q.scheme} needs activation ranges measured on the float "
                       f"graph: export without --quantize, then run arx calibrate --scheme "
                       f"{q.scheme}")
    if options.dtype != "float32":
        raise ArxError("--quantize keeps the decoder's other weights and its activations in "
                       "float32 (as arx calibrate does): drop --dtype")
    if options.inputs_embeds:
        raise ArxError("--quantize does not take --inputs-embeds: export with --inputs-embeds, "
                       "then run arx calibrate --scheme w8|w4 (it quantizes the decoder through "
                       "the embedder stage)")
    if options.kv_dtype != "fp32":
        raise ArxError("--quantize with --kv-dtype: export with --quantize, or export in fp32 "
                       "and run arx calibrate --scheme ... --kv-dtype, which measures the "
                       "cache's scales on text")


class EmitQuantizer:
    """What GraphBuilder.matmul asks: which linears to quantize (calibrate's defaults: every
    MatMul with a 2-D weight, the lm_head by the scheme's default) and how."""

    def __init__(self, quant):
        from arx.calibration.weight_only import LinearQuantizer

        self.quant = quant
        self._linear = LinearQuantizer(bits=quant.spec.weight_bits, group_size=quant.group_size,
                                       accuracy_level=quant.level)
        self.decided: dict[str, bool] = {}  # node name -> quantized, in graph order
        self.embedding: dict | None = None  # the token table's record once it is quantized

    def takes(self, name: str) -> bool:
        return self.decided.setdefault(name, name != LM_HEAD or self.quant.lm_head)

    def quantize(self, node, array):
        return self._linear.quantize(node, array)

    def embedding_form(self, table: str, head: str | None, width: int) -> str:
        """How the token table is emitted: "float", "int4" (codes of its own) or "head" (the
        codes of tied LM head `head`, quantized later): calibrate's choice on the float graph
        (embedding_quant.quantize_embedding), made before the head exists."""
        from arx.calibration.embedding_quant import embedding_plan, embedding_record

        q = self.quant
        if not q.embedding or (head is not None and not q.lm_head):
            return "float"  # (a float head reads the float table)
        plan = embedding_plan(bits=q.spec.weight_bits, group_size=q.group_size, width=width,
                              head=head)
        if plan is None:
            return "float"
        self.embedding = embedding_record(table, head if plan == "head" else None,
                                          q.spec.weight_bits)
        return "head" if plan == "head" else "int4"

    def quantize_embedding(self, node, table):
        from arx.calibration.embedding_quant import EmbeddingQuantizer

        return EmbeddingQuantizer(group_size=self.quant.group_size).quantize(node, table)

    def section(self) -> dict:
        """The names the manifest's quantization section lists."""
        return {"quantized": [n for n, q in self.decided.items() if q],
                "float": [n for n, q in self.decided.items() if not q],
                "embedding": self.embedding}


def check_moe(cfg) -> None:
    if getattr(cfg, "num_experts", 0):
        raise ArxError("--quantize does not take mixture-of-experts models yet (their experts "
                       "become QMoE in arx calibrate): export without --quantize, then run arx "
                       "calibrate --scheme w4|w8")


def finish(src, tmp: Path, manifest: Manifest, options) -> Manifest:
    """Evaluate the quantized bundle in `tmp` against the unquantized model, write calibrate's
    report, calibration.json and manifest section, and gate; raises ArxError over the gate
    (without --force): the caller's atomic_bundle then leaves nothing."""
    from arx.calibration import cache as cache_mod
    from arx.calibration.calibrator import extension, record_accuracy, weights_record
    from arx.calibration.data import load_samples
    from arx.calibration.report import AccuracyReport, percent, table, write

    copts = options.quantize
    data = dataclasses.replace(copts.data, seq_len=min(copts.data.seq_len, manifest.kv.max_seq_len))
    samples = load_samples(tmp, manifest, data, need_calib=0)
    metrics, reference = _metrics(src, tmp, manifest, samples.eval, copts.progress)
    q = copts.quant
    section = manifest.extensions[EXTENSION]  # the emitter's names (hf_decoder)
    settings = {"scheme": q.scheme, "method": q.method, "smoothquant": q.smoothquant,
                "group_size": q.group_size, "accuracy_level": q.level, "keep_fp": [],
                "float": section["float"], "linear_order": section["quantized"],
                "reference": reference, "per_layer": PER_LAYER_SKIPPED}
    report = AccuracyReport(q.scheme, metrics, [], copts.gate, samples.source, settings)
    embedding = section.get("embedding")
    info = {"version": cache_mod.VERSION, "scheme": q.scheme, "model_fingerprint": None,
            "data": {**samples.source, "samples": len(samples.calib), "tokens_sha256": samples.fingerprint()},
            "weights": weights_record(q, embedding)}
    (tmp / cache_mod.FILE_NAME).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    source = {"bundle": None, "checkpoint": str(src.path), "fingerprint": None,
              "exported_directly": True}
    manifest.extensions[EXTENSION] = extension(source, section["quantized"], section["float"],
                                               copts, embedding)
    text = table(report, copts.layer_report) + f"\n  per-layer error: {PER_LAYER_SKIPPED}"
    record_accuracy(manifest, report, write(report, tmp, copts.layer_report, plot=copts.plot))
    manifest.write(tmp)
    if not report.passed and not copts.force:
        raise ArxError(f"{q.scheme} raises perplexity by {report.metrics.ppl_increase:.2%} over the "
                       f"unquantized model, over the {percent(report.gate)} gate; try --group-size "
                       f"32, run arx calibrate for the per-layer analysis and its measured "
                       f"remedies, or pass --force to write it anyway (nothing was written)",
                       details=text)
    return manifest


def _metrics(src, tmp: Path, manifest: Manifest, samples: list[np.ndarray], progress: bool):
    """(ModelMetrics, what the reference was): the PyTorch model first, its top-k log-probs
    kept and the model freed, then the bundle on the same sequences."""
    import torch

    from arx.calibration.evaluate import compare, reference_rows, session_log_probs
    from arx.export.float32_compute import float32_compute, native_half
    from arx.export.parity_run import checkpoint_dtype
    from arx.runtime.decoder import DecoderSession

    dtype = checkpoint_dtype(src)
    module = src.torch_module(getattr(torch, dtype))
    compute = dtype if dtype == "float32" or native_half(dtype) else "float32"
    # half-precision weights in float32 arithmetic where the CPU has no half (float32_compute.py)
    with float32_compute() if compute != dtype else contextlib.nullcontext():
        rows = reference_rows(_torch_log_probs(module), samples, TOP_K, progress=progress,
                              label="reference (PyTorch)", batch=REFERENCE_BATCH)
    reference = {"framework": "torch", "model": type(module).__name__, "dtype": dtype,
                 "compute": compute,
                 "kl": f"top-{TOP_K} of the reference per position, the rest one bucket "
                       f"(a lower bound of the full KL)"}
    del module
    gc.collect()
    # default session options, as calibrate's evaluation (prepacked MatMulNBits weights round
    # differently at accuracy level 4): the same bundle gives calibrate's numbers
    with DecoderSession(tmp, manifest=manifest) as session:
        metrics = compare(None, session_log_probs(session), samples, rows=rows,
                          progress=progress, batch=BATCH)
    return metrics, reference


def _torch_log_probs(module):
    """(ids (B, S) right-padded, lens (B,)) -> log-probs (B, S, V) of the Hugging Face model."""
    import torch

    def run(ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        mask = (np.arange(ids.shape[1])[None, :] < lens[:, None]).astype(np.int64)
        with torch.no_grad():
            out = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         use_cache=False)
            # in torch, one fp32 copy (numpy's float64 log_softmax makes four of 2x the size)
            return torch.log_softmax(out.logits.float(), dim=-1).numpy()

    return run


def quantized_bytes(params: int, embed: int, bits: int, group_size: int,
                    embedding_quantized: bool = False) -> int:
    """Bundle bytes of a --quantize export: every parameter at `bits` plus one fp32 scale per
    block, and the embedding table (`embed` = V x H values: the Gather reads it) in fp32
    unless it is quantized too (w4: int4, as the linears)."""
    per_value = bits / 8 + 4 / group_size
    return int(params * per_value + embed * (per_value if embedding_quantized else 4))
