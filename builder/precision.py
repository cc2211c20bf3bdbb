"""Precision lives in the graph (TensorRT 11 is strongly typed): casts and Q/DQ nodes.

    fp16 / bf16   float weights and activations in the low type; norms computed in fp32
                  (Cast up before, Cast down after: the reductions over the hidden size are the
                  numerically fragile part); attention accumulates in fp32 inside the plugin;
                  every float graph output except the cache is returned in fp32 (the logits).
    int8          the calibrated Q/DQ graph of a quantized bundle (symmetric, zero points 0),
                  with the float parts around the Q/DQ pairs in fp16 as above.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx import TensorProto
from onnx_ir.passes.common import TopologicalSortPass

from arx.errors import ArxError
from arx.manifest import Manifest

from arx.export.external_data import to_proto_array
from arx.export.graph_ir import Editor, unmap

from .schemas import DOMAIN as PLUGIN_DOMAIN

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "int8": TensorProto.FLOAT16}
CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float16"}
_NUMPY = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}
_DTYPE_NAMES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
KEEP_FP32_OPS = ("RMSNormalization", "LayerNormalization")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QUANT_SCHEMES = ("w8a8",)  # schemes this build path turns into a TensorRT INT8 engine


def check_int8_bundle(manifest: Manifest) -> dict:
    """The quantization section of a calibrated bundle, or a clear error saying what to run."""
    q = manifest.extensions.get("quantization")
    if not q:
        raise ArxError("--precision int8 needs a calibrated bundle (Q/DQ graph); run "
                       "`arx calibrate BUNDLE --scheme w8a8` first and build its output")
    scheme = q.get("scheme") if isinstance(q, dict) else None
    if scheme not in QUANT_SCHEMES:
        raise ArxError(f"the bundle is quantized with scheme {scheme!r}; --precision int8 means "
                       f"int8 activations ({', '.join(QUANT_SCHEMES)}): build this weight-only "
                       f"bundle with --precision fp16 (or bf16), or calibrate --scheme w8a8")
    return q


def check_symmetric_qdq(model: ir.Model) -> int:
    """TensorRT INT8 is explicit and symmetric: every Q/DQ zero point must be 0. Returns count."""
    count = 0
    for n in model.graph:
        if n.op_type not in QDQ_OPS:
            continue
        count += 1
        if n.domain not in ("", "ai.onnx"):
            n.domain = ""  # com.microsoft Q/DQ -> the standard op (same math since opset 21)
        zp = n.inputs[2] if len(n.inputs) > 2 else None
        if zp is not None and (zp.const_value is None or np.any(zp.const_value.numpy() != 0)):
            raise ArxError(f"{n.op_type} {n.name} has a nonzero or non-constant zero point; "
                           f"TensorRT INT8 needs symmetric quantization: re-run arx "
                           f"calibrate --scheme w8a8 (symmetric)")
    if count == 0:
        raise ArxError("the bundle says it is quantized but its decoder has no Q/DQ nodes; "
                       "re-run arx calibrate")
    return count


def apply_precision(model: ir.Model, precision: str, cache_names: set[str]) -> None:
    """Rewrite a fp32 TensorRT-form graph to `precision` (in place). See the module docstring.

    cache_names: the past_key_values.* inputs and present.* outputs; they take the low type.
    Other float inputs keep their declared fp32: the network's (inputs_embeds, a VQ decoder's
    f_hat) are cast down on entry, those only a plugin reads (sampling_params) stay fp32.
    """
    if precision == "fp32":
        return
    low = LOW_TYPES[precision]
    graph = model.graph
    for node in graph:  # intermediate types recorded by an exporter go stale here
        for value in node.outputs:
            if not value.is_graph_output():
                value.type, value.shape = None, None
    ed = Editor(graph, prefix="precision")
    keep = _norm_params(graph)
    _convert_initializers(graph, low, keep)
    for n in graph:
        to = n.attributes.get("to")
        if n.op_type == "Cast" and to is not None and to.value == TensorProto.FLOAT:
            n.attributes["to"] = ir.convenience.convert_attribute("to", low)
    _wrap_norms(ed, low)
    _cast_inputs_down(ed, low, cache_names)
    for value in graph.inputs:
        if value.name in cache_names and value.dtype == ir.DataType.FLOAT:
            value.dtype = ir.DataType(low)
    for value in list(graph.outputs):
        if value.dtype != ir.DataType.FLOAT:
            continue
        if value.name in cache_names:
            value.dtype = ir.DataType(low)
        else:
            _cast_output_up(ed, value)
    TopologicalSortPass()(model)


def _norm_params(graph: ir.Graph) -> set[str]:
    """Scale/bias initializers of the norms: they stay fp32 with the fp32 norm; and Resize's
    scales, which ONNX types float32 whatever the data's type (a VQ decoder's upsampling)."""
    resize = [n.inputs[2] for n in graph if n.op_type == "Resize" and len(n.inputs) > 2]
    norms = [i for n in graph if n.op_type in KEEP_FP32_OPS for i in n.inputs[1:]]
    return {v.name for v in resize + norms if v is not None}


def _convert_initializers(graph: ir.Graph, low: int, keep: set[str]) -> None:
    """fp32 weights -> `low`, lazily: each is cast when the form is written (graph_ir.save),
    one tensor at a time, so a 32 GB fp32 bundle's form never holds its 16 GB fp16 copy."""
    for value in graph.initializers.values():
        if value.const_value.dtype != ir.DataType.FLOAT or value.name in keep:
            continue
        value.const_value = _cast_lazily(value.const_value, low)
        value.type = ir.TensorType(ir.DataType(low))


def _cast_lazily(tensor: ir.TensorProtocol, low: int) -> ir.LazyTensor:
    def cast() -> ir.Tensor:
        bits, _ = to_proto_array(tensor.numpy(), _DTYPE_NAMES[low])  # torch's cast where installed
        unmap(tensor)  # the fp32 bytes are read: their pages need not stay resident
        return ir.Tensor(bits.view(_NUMPY[low]), dtype=ir.DataType(low), name=tensor.name)

    return ir.LazyTensor(cast, dtype=ir.DataType(low), shape=tensor.shape, name=tensor.name)


def _wrap_norms(ed: Editor, low: int) -> None:
    """x (low) ─Cast fp32─► Norm (fp32 params) ─Cast low─► y (low)."""
    for n in [n for n in ed.graph if n.op_type in KEEP_FP32_OPS]:
        n.replace_input_with(0, ed.op("Cast", n.inputs[0], to=TensorProto.FLOAT,
                                      name=f"{n.name}/to_fp32"))
        ed.insert_after(n.outputs[0], "Cast", name=f"{n.name}/to_low", rename=f"{n.name}/fp32",
                        to=low)


def _cast_inputs_down(ed: Editor, low: int, cache_names: set[str]) -> None:
    """x (fp32 input) ─Cast low─► every standard-op reader: the engine's boundary keeps the
    type the runtime feeds, the weights it meets are low. An input an arx plugin reads is left
    alone (arx::sample takes its sampling_params in fp32)."""
    for value in list(ed.graph.inputs):
        if value.name in cache_names or value.dtype != ir.DataType.FLOAT:
            continue
        readers = list(value.uses())
        if not readers or any(u.node.domain == PLUGIN_DOMAIN for u in readers):
            continue
        ed.feed(readers, ed.op("Cast", value, to=low, name=f"{value.name}/to_low"))


def _cast_output_up(ed: Editor, value: ir.Value) -> None:
    """Graph output `value` in fp32: its producer writes a low-precision value, Cast brings it
    up. Readers inside the graph (the sampler reads last_logits) read the fp32 value too."""
    name = value.name
    ed.insert_after(value, "Cast", name=f"{name}/to_fp32", rename=f"{name}/low",
                    to=TensorProto.FLOAT)
