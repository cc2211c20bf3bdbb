"""w8 / w4: weight-only block quantization. Two forms of the same integers:

CPU form (what the bundle ships): com.microsoft MatMulNBits, made by ORT's MatMulNBitsQuantizer,
symmetric, one float scale per block of `group_size` rows of K. accuracy_level=1 computes in
fp32 (activations stay float: w4's default); accuracy_level=4 lets the CPU kernel quantize
activations to int8 per block on the fly and use integer dot products (faster, w8's default,
but a block holding an activation outlier loses its other values).

    x (.., K) ─ MatMulNBits(B uint8 (N, K/bs, bs*bits/8), scales (N, K/bs), bits, block_size) ─► y

TensorRT form (`matmulnbits_to_qdq`): standard ONNX, opset >= 21, what TensorRT's weight-only
INT4/INT8 path expects. Lossless: the same integers and scales, re-laid out.

    W_q int4|int8 (K, N) ─ DequantizeLinear(scale (K/bs, N), axis=0, block_size=bs) ─┐
    x (.., K) ──────────────────────────────────────────────────────────────────── MatMul ─► y

The token embedding: calibration/embedding_quant.py.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from arx.export.graph_ir import add_initializer, take_place
from arx.export.tensor_source import contiguous


MIN_QDQ_OPSET = 21  # DequantizeLinear with block_size and int4
SYMMETRIC = True  # no zero points: the TensorRT form below needs none
COLUMNS = 8192  # LinearQuantizer's chunk of N (a 4096-row chunk: 128 MB in float32)


def quantize_weight_only(model: onnx.ModelProto, *, bits: int, group_size: int, accuracy_level: int,
                         exclude: list[str]) -> onnx.ModelProto:
    """MatMulNBits form of `model` (a copy); MatMuls named in `exclude` stay float."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _quiet()
    q = MatMulNBitsQuantizer(copy, bits=bits, block_size=group_size, is_symmetric=SYMMETRIC,
                             accuracy_level=accuracy_level or None, nodes_to_exclude=list(exclude),
                             op_types_to_quantize=("MatMul",))
    q.process()
    return q.model.model


class LinearQuantizer:
    """The quantizer above, one MatMul at a time: `arx export --quantize` calls it on each weight
    as it is emitted, so the float model is never whole. The node quantizer is the one
    MatMulNBitsQuantizer drives (same config), so blobs, scales and node attributes are
    byte-identical to `quantize_weight_only` on the same float weight."""

    def __init__(self, *, bits: int, group_size: int, accuracy_level: int):
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                      DefaultWeightOnlyQuantizer)

        config = DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=SYMMETRIC,
                                              accuracy_level=accuracy_level or None,
                                              op_types_to_quantize=("MatMul",), bits=bits)
        self._quantizer = DefaultWeightOnlyQuantizer(config)
        _quiet()

    def quantize(self, node: onnx.NodeProto, array: np.ndarray
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """(nodes replacing `node`, their new initializers) for MatMul `node` whose weight (its
        input 1) is `array` (K, N), any float dtype, a view is fine.

        The nodes are the quantizer's own, made on a (K, 1) stand-in of the weight (names and
        attributes do not depend on N, which is then set); the codes and scales come from the
        quantizer's block quantizer (`qbits_block_quant`, what its node path calls) COLUMNS
        columns at a time, written into the whole weight's arrays: each column's blocks run
        along K on their own, so the chunks stacked along N are the whole weight's bytes. The
        float weight itself never becomes a TensorProto: its serialisation, the graph's copy of
        it and the read back took 16 of the 1B w4 export's 21 s of quantizing, and on a
        128k-vocabulary LM head the quantizer's four float32 copies of a whole weight were 4 GB."""
        k, n = array.shape
        nodes, stand_in = self._quantize_node(node, np.zeros((k, 1), np.float32))
        (quantized,) = [m for m in nodes if m.op_type == "MatMulNBits"]
        codes_name, scales_name = quantized.input[1], quantized.input[2]
        if sorted(t.name for t in stand_in) != sorted((codes_name, scales_name)):
            raise RuntimeError(f"onnxruntime's quantizer gave {[t.name for t in stand_in]} for "
                               f"{node.name}, not codes and scales (an unsupported version?)")
        template = {t.name: numpy_helper.to_array(t) for t in stand_in}
        codes = np.empty((n, *template[codes_name].shape[1:]), template[codes_name].dtype)
        scales = np.empty((n, *template[scales_name].shape[1:]), np.float32)
        for a in range(0, n, COLUMNS):
            chunk = contiguous(array[:, a:a + COLUMNS]).astype(np.float32, copy=False)
            codes[a:a + chunk.shape[1]], scales[a:a + chunk.shape[1]], _ = \
                self._quantizer.qbits_block_quant(chunk)
        for attr in quantized.attribute:
            if attr.name == "N":
                attr.i = n
        return nodes, [numpy_helper.from_array(codes, codes_name),
                       numpy_helper.from_array(scales.astype(template[scales_name].dtype),
                                               scales_name)]

    def _quantize_node(self, node: onnx.NodeProto, weight: np.ndarray):
        """The quantizer's node path on MatMul `node` with `weight` as its initializer."""
        proto = numpy_helper.from_array(weight, node.input[1])
        graph = helper.make_graph([node], "one_linear", [], [], initializer=[proto])
        nodes = self._quantizer.quantize(node, [graph])
        return nodes, [t for t in graph.initializer if t.name != proto.name]


def _stack(chunks: list[onnx.TensorProto]) -> onnx.TensorProto:
    """One initializer from its per-chunk parts, stacked along their first axis."""
    return numpy_helper.from_array(np.concatenate([numpy_helper.to_array(t) for t in chunks]),
                                   chunks[0].name)


def _quiet() -> None:
    """The quantizer logs one INFO line per node; keep the CLI quiet."""
    import logging

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)


def _unpack(packed: np.ndarray, bits: int, k: int, n: int, k_blocks: int) -> np.ndarray:
    """MatMulNBits B (N, k_blocks, blob) uint8 -> unsigned codes (N, K); low nibble first."""
    flat = packed.reshape(n, -1)
    if bits == 8:
        codes = flat
    else:
        codes = np.empty((n, flat.shape[1] * 2), dtype=np.uint8)
        codes[:, 0::2], codes[:, 1::2] = flat & 0x0F, flat >> 4
    return codes[:, :k]  # the last block is padded up to block_size


def matmulnbits_to_qdq(model: ir.Model) -> int:
    """Rewrite every symmetric MatMulNBits of `model` (onnx_ir, in place: the TensorRT form's
    IR, builder/form.py) as DequantizeLinear(block) + MatMul; returns how many.

    The Q/DQ-block form TensorRT imports for weight-only quantization; it also runs on ORT CPU.
    """
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
    for node in nodes:
        _node_to_qdq(model.graph, node)
    if nodes:
        model.opset_imports[""] = max(model.opset_imports.get("", 1), MIN_QDQ_OPSET)
    return len(nodes)


def _node_to_qdq(graph: ir.Graph, node: ir.Node) -> None:
    attrs = {name: a.value for name, a in node.attributes.items()}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    x, packed, scales, zero_points, bias = inputs[0], inputs[1], inputs[2], inputs[3], inputs[5]
    if zero_points is not None:
        raise ValueError(f"{node.name}: asymmetric MatMulNBits (zero points) has no symmetric Q/DQ form")
    k_blocks = (k + bs - 1) // bs
    block_scales = scales.const_value.numpy().reshape(n, k_blocks)
    # symmetric MatMulNBits stores code = q + 2^(bits-1) (the implicit zero point)
    q = (_unpack(packed.const_value.numpy(), bits, k, n, k_blocks).astype(np.int16)
         - (1 << (bits - 1))).T  # (K, N)
    codes, suffix = (q.astype(ml_dtypes.int4), "_int4") if bits == 4 else (q.astype(np.int8), "_int8")
    weight = add_initializer(graph, packed.name + suffix, codes)
    scale = add_initializer(graph, packed.name + "_block_scale", block_scales.T)  # (K/bs, N)
    y = node.outputs[0]
    w = ir.Value(name=y.name + "_weight")
    dq = ir.node("DequantizeLinear", [weight, scale], {"axis": 0, "block_size": bs},
                 outputs=[w], name=node.name + "_dq")
    product = ir.Value(name=y.name + "_nobias" if bias is not None else None)
    new = [dq, ir.node("MatMul", [x, w], outputs=[product], name=node.name + "_matmul")]
    if bias is not None:
        new.append(ir.node("Add", [product, bias], outputs=[ir.Value()], name=node.name + "_bias"))
    take_place(y, new[-1].outputs[0])
    graph.insert_before(node, new)
    graph.remove(node, safe=True)
    for blob in (packed, scales):  # the packed blobs are no longer read
        if not blob.uses():
            graph.initializers.pop(blob.name)
