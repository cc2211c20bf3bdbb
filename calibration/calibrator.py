"""`arx calibrate`: an fp32 bundle in, a quantized bundle out, behind an accuracy gate.

    read data ─► quantize (w8a8: SmoothQuant fold ─► calibrate ranges ─► Q/DQ;
                           w8/w4: MatMulNBits) ─► write bundle ─► evaluate vs fp32 ─► gate

The bundle is assembled in a temp folder (`atomic_bundle`) and evaluated there through the
runtime; it is renamed into place only if the gate passes (or --force). A failed gate, bad
data or any error leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from arx.bundle import atomic_bundle, check_writable_output
from arx.calibration import cache as cache_mod
from arx.calibration import graph as G
from arx.calibration import kv_quant
from arx.calibration import next_scale
from arx.calibration import remedies
from arx.calibration.data import Samples, load_samples
from arx.calibration.moe_quant import qmoe_fits, quantize_moe
from arx.calibration.options import CalibrateOptions
from arx.calibration.report import AccuracyReport, percent, table, write
from arx.errors import ArxError
from arx.export.moe_rewrite import densify_moe
from arx.export.step_graph import EXTENSION as STEP_EXTENSION
from arx.export.step_graph import STEP_STAGE, rebuild_step_graph
from arx.manifest import MANIFEST_NAME, Manifest, read_manifest
from arx.progress import Steps

EXTENSION = "quantization"  # manifest.extensions key a quantized bundle carries
PROBE_SAMPLES = 8  # held-out sequences for the per-layer error (it runs both graphs with probes)


@dataclass
class CalibrationResult:
    output: Path
    manifest: Manifest
    report: AccuracyReport
    table: str  # the printed accuracy table


@dataclass
class _Quantized:
    model: onnx.ModelProto  # the quantized decoder
    reference: onnx.ModelProto  # fp32 graph it is compared with per layer (SmoothQuant-folded)
    calibration: dict  # the calibration.json content
    quantized: list[str]
    kept: list[str]
    linears: list[G.Linear]
    kv_scales: dict | None = None  # --kv-dtype int8: the cache's scales, per past name
    embedding: dict | None = None  # the token embedding's record, where it is quantized


def calibrate_bundle(*, bundle: str | Path, output: str | Path,
                     options: CalibrateOptions) -> CalibrationResult:
    """Quantize `bundle` into `output` with `options`; raise ArxError (nothing written) on failure."""
    bundle, output = Path(bundle), Path(output)
    manifest = read_manifest(bundle)
    images = next_scale.is_next_scale(manifest)  # its data: images it draws (next_scale.py)
    check_source(bundle, manifest, images, options.quant.spec.activations)
    if images:
        next_scale.check_options(options)
    elif options.data.seq_len > manifest.kv.max_seq_len:
        raise ArxError(f"--seq-len {options.data.seq_len} exceeds the bundle's context of "
                       f"{manifest.kv.max_seq_len} tokens; use --seq-len {manifest.kv.max_seq_len} "
                       f"or less")
    check_writable_output(output, overwrite=options.overwrite)  # before minutes of work
    options = with_reduce_range(options)
    q_opts = options.quant
    cached = cache_mod.read(options.calibration_cache) if options.calibration_cache else None
    steps = Steps(5, enabled=options.progress)
    with steps.step("reading data" if not images else "drawing held-out images (fp32)"):
        need = 0 if cached else q_opts.min_samples
        samples = next_scale.load_image_samples(bundle, manifest, options.data) if images else \
            load_samples(bundle, manifest, options.data, need_calib=need)
        refs = next_scale.draw_references(bundle, samples, progress=options.progress) \
            if images else None
    with tempfile.TemporaryDirectory(prefix="arx-calibrate-") as work:
        with steps.step(f"quantizing ({q_opts.scheme})"):
            q = _quantize(bundle, manifest, samples, options, cached, Path(work), images)
            q.kv_scales = kv_quant.cache_scales(bundle, options.kv_cache, samples)
        with atomic_bundle(output, overwrite=options.overwrite) as tmp:
            with steps.step(f"writing {output.name}"):
                out_manifest = _write_bundle(bundle, manifest, tmp, q, options)
                if options.kv_cache != "float32":
                    out_manifest = kv_quant.quantize_cache(tmp, out_manifest, options.kv_cache,
                                                           q.kv_scales, samples)
                    out_manifest.write(tmp)
            with steps.step("evaluating against fp32"):
                report = _evaluate(bundle, tmp, manifest, samples, q, options, Path(work), refs)
            with steps.step("writing the report"):
                text = table(report, options.layer_report)
                files = write(report, tmp, options.layer_report, plot=options.plot)
                record_accuracy(out_manifest, report, files)
                out_manifest.write(tmp)
                score = next_scale.perplexity_increase(samples, refs, report.metrics) \
                    if images else None
                _gate(report, options, text, q, tmp, manifest.decoder.file, samples, Path(work), score)
    return CalibrationResult(output, out_manifest, report, text)


def with_reduce_range(options: CalibrateOptions) -> CalibrateOptions:
    """--reduce-range auto decided on this host (on where its int8 MatMul saturates), so the
    bundle and its report record what was done; weight-only schemes: off."""
    q = options.quant
    if q.spec.activations:
        from arx.runtime.int8_kernel import reduce_range_needed

        choice = "on" if reduce_range_needed(q.reduce_range) else "off"
    else:
        choice = "off"
    return replace(options, quant=replace(q, reduce_range=choice))


def check_source(bundle: Path, manifest: Manifest, images: bool = False,
                 activations: bool = False) -> None:
    if EXTENSION in manifest.extensions:
        scheme = manifest.extensions[EXTENSION].get("scheme", "?")
        raise ArxError(f"bundle {bundle} is already quantized ({scheme}); calibrate its fp32 "
                       f"source bundle instead (the one `arx export` wrote)")
    if manifest.kv.dtype != "float32":
        raise ArxError(f"bundle {bundle} has a {manifest.kv.dtype} cache; arx calibrate starts "
                       f"from an fp32 export (arx export without precision flags)")
    if manifest.decoder.input("input_ids") is None and not images:
        # ids reach such a decoder through the bundle's embed stage (Janus' image tokens), which
        # the evaluation's sessions run; w8a8's range probes feed the graph ids, not embeddings
        if manifest.pipeline.embed is None:
            raise ArxError(f"bundle {bundle}'s decoder takes inputs_embeds (arx export "
                           f"--inputs-embeds), which arx calibrate does not quantize yet; "
                           f"calibrate an export without --inputs-embeds")
        if activations:
            raise ArxError(f"bundle {bundle}'s decoder takes embeddings from its "
                           f"{manifest.pipeline.embed!r} stage: arx calibrate quantizes it with "
                           f"the weight-only schemes; use --scheme w8 or w4")
        if _reads_decoder_data(bundle, manifest, manifest.pipeline.embed):
            raise ArxError(f"bundle {bundle}'s {manifest.pipeline.embed!r} stage reads the tied "
                           f"token table from the decoder's data file, which arx calibrate "
                           f"rewrites; calibrate an export without --inputs-embeds")


def _reads_decoder_data(bundle: Path, manifest: Manifest, stage: str) -> bool:
    """Whether `stage`'s weights live in the decoder's external data file (a tied table that
    `arx export --inputs-embeds` stores once, in the decoder)."""
    model = onnx.load(str(bundle / manifest.stages[stage].file), load_external_data=False)
    data = manifest.decoder.file + ".data"
    return any(e.key == "location" and e.value == data
               for t in model.graph.initializer for e in t.external_data)


def _quantize(bundle, manifest, samples: Samples, options: CalibrateOptions, cached, work: Path,
              images: bool = False) -> _Quantized:
    q_opts = options.quant
    model = G.load_decoder(bundle, manifest)
    # w4/w8: an --moe op bundle's experts become QMoE (still only the chosen experts run);
    # w8a8, or blocks QMoE cannot take: the dense form's 2-D MatMuls, quantized as any linear
    qmoe = not q_opts.spec.activations and qmoe_fits(model, q_opts.group_size)
    embedding = None  # the token table's record where it is quantized (embedding_record)
    moe = "qmoe" if qmoe else "dense" if densify_moe(model) else ""
    tied = q_opts.lm_head and G.untie_lm_head(model)  # the head then holds the table's codes
    linears = G.linears(model)
    quantize, kept = G.split_linears(linears, q_opts.keep_fp, q_opts.lm_head)
    info = {"version": cache_mod.VERSION, "scheme": q_opts.scheme,
            "model_fingerprint": cache_mod.fingerprint(bundle, manifest),
            "data": {**samples.source, "samples": len(samples.calib), "tokens_sha256": samples.fingerprint()}}
    if moe:
        info["moe_form"] = moe  # docs/design.md, "Mixture of experts"
    if q_opts.spec.activations:
        from arx.calibration.static import quantize_static_bundle

        ranges_of = next_scale.step_graph_ranges(
            manifest, next_scale.calibration_source(bundle, samples, progress=options.progress),
            linears, q_opts, work) if images else None
        qm, ref, calib = quantize_static_bundle(model, manifest, samples, linears, quantize, kept,
                                                options, cached, info, work, ranges_of)
    else:
        from arx.calibration.embedding_quant import quantize_embedding
        from arx.calibration.weight_only import quantize_weight_only

        qm = quantize_weight_only(model, bits=q_opts.spec.weight_bits, group_size=q_opts.group_size,
                                  accuracy_level=q_opts.level, exclude=kept)
        if qmoe:
            quantize_moe(qm, bits=q_opts.spec.weight_bits, block=q_opts.group_size,
                         accuracy_level=q_opts.level or 0)
        if q_opts.embedding:
            embedding = quantize_embedding(qm, group_size=q_opts.group_size,
                                           head=G.LM_HEAD if tied else None,
                                           bits=q_opts.spec.weight_bits)
        ref, calib = model, {**info, "weights": weights_record(q_opts, embedding)}
    by_name = {lin.node: lin for lin in linears}
    return _Quantized(qm, ref, calib, quantize, kept, [by_name[n] for n in quantize],
                      embedding=embedding)


def weights_record(q_opts, embedding: dict | None) -> dict:
    """calibration.json's "weights" (arx export --quantize writes the same)."""
    return {"bits": q_opts.spec.weight_bits, "group_size": q_opts.group_size, "symmetric": True,
            "embedding": f"int{embedding['bits']}" if embedding else "float"}


def _write_bundle(src: Path, manifest: Manifest, tmp: Path, q: _Quantized, options: CalibrateOptions) -> Manifest:
    """Copy the source's files (tokenizer, ...) except the decoder; save the quantized decoder."""
    decoder = manifest.decoder.file
    step = manifest.stages.get(STEP_STAGE)
    skip = {decoder, decoder + ".data", MANIFEST_NAME, cache_mod.FILE_NAME, step and step.file}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in skip:  # folders (reports, engines) belong to the fp32 graph
            shutil.copy2(f, tmp / f.name)
    G.save_model(q.model, tmp / decoder)
    (tmp / cache_mod.FILE_NAME).write_text(json.dumps(q.calibration, indent=1) + "\n", encoding="utf-8")
    out = copy.deepcopy(manifest)
    source = {"bundle": str(src), "fingerprint": q.calibration["model_fingerprint"]}
    out.extensions[EXTENSION] = extension(source, q.quantized, q.kept, options, q.embedding)
    if step is not None:
        # the general-step graph reads the decoder's weights: written anew over them
        out.extensions[STEP_EXTENSION] = rebuild_step_graph(tmp, manifest.decoder, manifest.kv,
                                                            step.file)
    out.provenance = {**manifest.provenance, "calibrated_from": str(src)}
    out.write(tmp)
    return out


def extension(source: dict, quantized: list[str], kept: list[str], options: CalibrateOptions,
              embedding: dict | None = None) -> dict:
    """The manifest's quantization section (arx export --quantize writes the same);
    `embedding`: the token embedding's record where it is quantized (embedding_quant)."""
    o = options.quant
    ext = {"scheme": o.scheme, "summary": o.spec.summary, "weight_bits": o.spec.weight_bits,
           "activation_bits": 8 if o.int8_activations else None, "symmetric": True,
           "quantized": quantized, "float": kept, "calibration_file": cache_mod.FILE_NAME,
           "source": source}
    if o.spec.activations:
        from arx.runtime.int8_kernel import reduce_range_needed  # as quantize_w8a8 decided

        ext.update(format="qdq", per_channel_weights=True, weight_axis=1, method=o.method,
                   smoothquant_alpha=o.smoothquant, reduce_range=reduce_range_needed(o.reduce_range),
                   tensorrt={"form": "explicit int8 Q/DQ", "precision": "int8"})
    else:
        ext.update(format="MatMulNBits", group_size=o.group_size, accuracy_level=o.level,
                   embedding=embedding or "float",
                   tensorrt={"form": "DequantizeLinear block_size (opset 21) + MatMul, made by "
                                     "arx build", "precision": "fp16 or bf16"})
    return ext


def _evaluate(src, tmp, manifest, samples: Samples, q: _Quantized, options, work: Path,
              refs=None) -> AccuracyReport:
    """The report: model metrics through the runtime, per-layer error through probes; `refs`:
    a next-scale bundle's held-out images (next_scale.draw_references)."""
    from arx.calibration.evaluate import layer_errors, model_metrics

    names = [t for lin in q.linears for t in (lin.input, lin.output)]
    if refs is None:
        metrics = model_metrics(src, tmp, samples.eval, progress=options.progress)
        with _embedding(src, manifest) as embed:  # ids -> the decoder's embeddings, if it takes them
            feeds = G.embedded_feeds(manifest, embed) if embed else None
            ref_probe, q_probe = (G.Probe(m, names, manifest, work, feeds) for m in (q.reference, q.model))
            layers = layer_errors(ref_probe, q_probe, q.linears, samples.eval[:PROBE_SAMPLES],
                                  progress=options.progress)
    else:  # scale steps run the general-step graph: probe that, on recorded step feeds
        metrics = next_scale.image_metrics(src, tmp, samples, refs, progress=options.progress)
        ref_probe, q_probe = (G.Probe(next_scale.step_probe_model(m, manifest), names, manifest,
                                      work, next_scale.step_feeds) for m in (q.reference, q.model))
        layers = layer_errors(ref_probe, q_probe, q.linears,
                              next_scale.probe_feeds(src, samples, refs), progress=options.progress)
    settings = {"scheme": options.quant.scheme, "method": options.quant.method,
                "smoothquant": options.quant.smoothquant, "group_size": options.quant.group_size,
                "accuracy_level": options.quant.level, "reduce_range": options.quant.reduce_range,
                "keep_fp": list(options.quant.keep_fp), "float": q.kept,
                "linear_order": [lin.node for lin in q.linears]}
    kv = None
    if options.kv_cache != "float32":  # what the cache alone costs, beside weights + cache
        settings["kv_dtype"] = options.kv_dtype
        kv = kv_quant.cache_only_metrics(src, options.kv_cache, q.kv_scales, samples, work)
    return AccuracyReport(options.quant.scheme, metrics, layers, options.gate, samples.source,
                          settings, kv)


@contextlib.contextmanager
def _embedding(src: Path, manifest: Manifest):
    """The source bundle's embed stage as ids (1, S) -> (1, S, H) where its decoder takes
    inputs_embeds (Janus: image tokens through image_embed), else None."""
    if manifest.decoder.input("input_ids") is not None:
        yield None
        return
    from arx.runtime.decoder import EmbedStage

    stage = EmbedStage(src, manifest)
    try:
        yield stage
    finally:
        stage.close()


def record_accuracy(manifest: Manifest, report: AccuracyReport, files: dict) -> None:
    # Recorded before the gate decides: a failing report only survives when --force wrote it.
    m = report.metrics
    manifest.extensions[EXTENSION]["accuracy"] = {
        "ppl_fp32": m.ppl_fp32, "ppl_quantized": m.ppl_quant, "ppl_increase": m.ppl_increase,
        "top1_agreement": m.top1_agreement, "kl_mean": m.kl_mean, "tokens": m.tokens,
        "gate": report.gate, "passed": report.passed, "forced": not report.passed,
        "data": report.data.get("kind")}
    manifest.extensions[EXTENSION]["reports"] = files


def _gate(report: AccuracyReport, options: CalibrateOptions, text: str, q: _Quantized, tmp: Path,
          decoder: str, samples: Samples, work: Path, score=None) -> None:
    """Refuse a report over the gate (unless --force), suggesting remedies measured on the same
    held-out text (arx.calibration.remedies)."""
    if report.passed or options.force:
        return
    trial = remedies.trial(tmp, decoder, samples.eval, report.metrics.ppl_fp32, work, score)
    if options.kv_cache != "float32":
        trial = kv_quant.with_cache(trial, tmp, options.kv_cache, q.kv_scales)
    tips = remedies.measure(remedies.candidates(report, options, q, work, text=score is None), trial)
    worst = ", ".join(e.name for e in report.worst(3))
    raise ArxError(
        f"{options.quant.scheme} raises perplexity by {report.metrics.ppl_increase:.2%}, over the "
        f"{percent(report.gate)} gate; worst layers: {worst}; {remedies.advice(tips, report.gate)}, "
        f"or pass --force to write it anyway (nothing was written)", details=text)
