"""w8a8: explicit, symmetric int8 Q/DQ around the decoder's linears (TensorRT 11 style).

What one quantized linear looks like (TensorRT fuses it into an int8 GEMM; ORT CPU into
MatMulIntegerToFloat):

    x (.., K) ─ QuantizeLinear(s_x, zp=0) ─ DequantizeLinear(s_x, zp=0) ─┐
                                                                        MatMul ─► y (float)
    W_q int8 (K, N) ──────────── DequantizeLinear(s_w (N,), zp=0, axis=1) ┘

Activations: one symmetric scale per tensor from the calibrated range; weights: one scale per
output channel (axis 1 of the (K, N) weight). Only MatMul inputs get Q/DQ: the outputs stay
float (OpTypesToExcludeOutputQuantization), GroupQueryAttention, norms and the residual stream
are untouched, and the lm_head stays float unless asked. Linears that read the same input
(gate and up) are packed into one MatMul first (`pack_parallel_linears`) so every activation
DQ feeds one MatMul, which ORT CPU needs to fuse it into MatMulIntegerToFloat.

Ranges come from ORT's calibrators and pass through the JSON calibration cache before they
are used, so a run from fresh data and a run from the cache quantize with the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from arx.calibration.graph import Linear, add_contrib_output_types, pack_parallel_linears, prefill_feeds, save_model
from arx.calibration.options import QuantOptions
from arx.manifest import Manifest
from arx.progress import bar

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, _METHODS[name])


class _Reader:
    """ORT CalibrationDataReader over one feed dict."""

    def __init__(self, feeds: dict):
        self.feeds = feeds

    def get_next(self):
        feeds, self.feeds = self.feeds, None
        return feeds


def prefill_source(manifest: Manifest, samples, *, progress: bool):
    """The feeds of calibrate_ranges for a text bundle: one prefill per sample, batch 1."""
    def run(emit, names: set[str]) -> None:
        for ids in bar(samples, "calibrating", total=len(samples), enabled=progress):
            emit(prefill_feeds(manifest, ids, names))
    return run


def calibrate_ranges(model_path: Path, source, linears: list[Linear], options: QuantOptions
                     ) -> dict[str, list[float]]:
    """Symmetric activation ranges {tensor: [lo, hi]} of every linear's input.

    source(emit, input names) calls emit(feeds) once per run of `model_path` to calibrate on
    (prefill_source; a next-scale bundle's scale steps, calibration/next_scale.py)."""
    import onnxruntime as ort
    from onnxruntime.quantization import create_calibrator

    extra = {"symmetric": True}
    if options.method == "percentile":
        extra["percentile"] = options.percentile
    # the calibrator's own session (its logger is fixed when made): no warning per run
    ort.set_default_logger_severity(3)
    try:
        with tempfile.TemporaryDirectory(prefix="arx-calib-") as tmp:
            calibrator = create_calibrator(Path(model_path), ["MatMul"],
                                           augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=_method(options.method),
                                           use_external_data_format=True, extra_options=extra)
            names = {i.name for i in calibrator.infer_session.get_inputs()}
            # One collect_data call per run: the histogram collectors stack each call's
            # outputs into one array, which fails for sequences of different lengths; every
            # collector merges across calls (min/max, histograms), so the result is the same.
            source(lambda feeds: calibrator.collect_data(_Reader(feeds)), names)
            data = calibrator.compute_data()
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default
    wanted = {lin.input for lin in linears}
    # float() of a float32 is exact and JSON keeps Python floats exactly: the cache round-trips
    return {k: [_scalar(v.range_value[0]), _scalar(v.range_value[1])]
            for k, v in sorted(data.items()) if k in wanted}


def _scalar(x) -> float:
    return float(np.asarray(x, dtype=np.float32).reshape(-1)[0])


def quantize_w8a8(model: onnx.ModelProto, ranges: dict[str, list[float]], quantize: list[str],
                  exclude: list[str], options: QuantOptions, workdir: Path) -> onnx.ModelProto:
    """Insert Q/DQ with quantize_static, feeding it our (cached) ranges as its calibration cache."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    from arx.runtime.int8_kernel import reduce_range_needed

    method = _method(options.method)
    tensors = TensorsData(method, {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                                   for k, (lo, hi) in ranges.items()})
    cache = Path(workdir) / "ort_ranges.json"
    save_tensors_data(tensors, cache)
    model = _typed_copy(model)
    src, dst = Path(workdir) / "w8a8_in.onnx", Path(workdir) / "w8a8_out.onnx"
    save_model(model, src)
    with _quiet():
        quantize_static(
            str(src), str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            per_channel=True, reduce_range=reduce_range_needed(options.reduce_range),
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=quantize, nodes_to_exclude=exclude,
            use_external_data_format=True, calibrate_method=method, calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": ["MatMul"],
                           # keep every Q/DQ pair explicit: TensorRT reads precision from the graph
                           "QDQKeepRemovableActivations": True})
    return onnx.load(str(dst), load_external_data=True)


@contextlib.contextmanager
def _quiet():
    """ORT's quantizer warns on the root logger about pre-processing and shape inference of
    com.microsoft ops; both are expected here (types are declared by add_contrib_output_types)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _typed_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    add_contrib_output_types(out)
    return out


def requantize(reference: onnx.ModelProto, ranges: dict[str, list[float]], quantize: list[str],
               kept: list[str], options: QuantOptions, workdir: Path) -> onnx.ModelProto:
    """w8a8 of the (SmoothQuant-folded) fp32 `reference` from known ranges: no calibration run."""
    packed = onnx.ModelProto()
    packed.CopyFrom(reference)
    return quantize_w8a8(packed, ranges, pack_parallel_linears(packed, quantize), kept, options, workdir)


def quantize_static_bundle(model: onnx.ModelProto, manifest: Manifest, samples, linears: list[Linear],
                           quantize: list[str], kept: list[str], options, cached: dict | None,
                           info: dict, workdir: Path, ranges_of=None):
    """w8a8 of `model`: (quantized model, fp32 reference after SmoothQuant, calibration.json).

    With `cached` (a calibration.json) no data is run: its SmoothQuant scales and ranges are used.
    ranges_of(reference path) -> ranges calibrates them (default: text prefills of samples.calib).
    """
    from arx.calibration import cache as cache_mod
    from arx.calibration import smoothquant as sq
    from arx.calibration.graph import Probe

    q_opts = options.quant
    add_contrib_output_types(model)  # ORT skips tensors of unknown type (the o_proj input)
    if cached is not None:
        cache_mod.check_matches(cached, model_fingerprint=info["model_fingerprint"],
                                method=q_opts.method, alpha=q_opts.smoothquant)
    scales = None
    if q_opts.smoothquant is not None:
        groups = sq.find_groups(model, set(quantize))
        if cached is not None:
            stored = cached["smoothquant"]["scales"]
            groups = [g for g in groups if g.name in stored]
            scales = {g.name: np.asarray(stored[g.name], dtype=np.float32) for g in groups}
        else:
            probe = Probe(model, [g.act for g in groups], manifest, workdir)
            maxima = sq.activation_maxima(probe, groups, samples.calib)
            scales = sq.smoothing_scales(model, groups, maxima, q_opts.smoothquant)
            # through JSON and back, exactly as a cached run will see them
            scales = {k: np.asarray(json.loads(json.dumps(v.tolist())), dtype=np.float32) for k, v in scales.items()}
        sq.fold(model, groups, scales)
    ref_path = Path(workdir) / "reference.onnx"
    save_model(model, ref_path)
    by_name = {lin.node: lin for lin in linears}
    if cached is not None:
        ranges = cache_mod.ranges_for(cached, [by_name[n].input for n in quantize])
    else:
        if ranges_of is None:
            ranges = calibrate_ranges(ref_path, prefill_source(manifest, samples.calib,
                                                               progress=options.progress),
                                      linears, q_opts)
        else:
            ranges = ranges_of(ref_path)
    qmodel = requantize(model, ranges, quantize, kept, q_opts, workdir)
    calib = {**info, "method": q_opts.method,
             "percentile": q_opts.percentile if q_opts.method == "percentile" else None,
             "smoothquant": None if scales is None else
             {"alpha": q_opts.smoothquant, "scales": {k: v.tolist() for k, v in scales.items()}},
             "ranges": ranges}
    if cached is not None:
        calib["data"] = cached.get("data", {})
        calib["reused_from"] = cached.get("_path")
    return qmodel, model, calib
