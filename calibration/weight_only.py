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
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arx.calibration.graph import initializers

MIN_QDQ_OPSET = 21  # DequantizeLinear with block_size and int4
SYMMETRIC = True  # no zero points: the TensorRT form below needs none


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

    def quantize(self, node: onnx.NodeProto, weight: onnx.TensorProto
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """(nodes replacing `node`, their new initializers) for MatMul `node` reading `weight`."""
        graph = helper.make_graph([node], "one_linear", [], [], initializer=[weight])
        nodes = self._quantizer.quantize(node, [graph])
        return nodes, [t for t in graph.initializer if t.name != weight.name]


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


def _pack_int4(values: np.ndarray) -> bytes:
    """Signed int4 (row-major) -> ONNX INT4 raw data: two per byte, first in the low nibble."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nib = (flat & 0x0F).astype(np.uint8)
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def matmulnbits_to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every symmetric MatMulNBits of `model` (a copy) as DequantizeLinear(block) + MatMul.

    The Q/DQ-block form TensorRT imports for weight-only quantization; it also runs on ORT CPU.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = initializers(out)
    nodes = []
    for node in out.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        nodes.extend(_node_to_qdq(out, node, inits))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    for op in out.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < MIN_QDQ_OPSET:
            op.version = MIN_QDQ_OPSET
    return out


def _node_to_qdq(model: onnx.ModelProto, node: onnx.NodeProto, inits) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    if len(node.input) > 3 and node.input[3]:
        raise ValueError(f"{node.name}: asymmetric MatMulNBits (zero points) has no symmetric Q/DQ form")
    k_blocks = (k + bs - 1) // bs
    packed = numpy_helper.to_array(inits[node.input[1]])
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, k_blocks)
    # symmetric MatMulNBits stores code = q + 2^(bits-1) (the implicit zero point)
    q = (_unpack(packed, bits, k, n, k_blocks).astype(np.int16) - (1 << (bits - 1))).T  # (K, N)
    base = node.input[1]
    if bits == 4:
        weight = helper.make_tensor(base + "_int4", TensorProto.INT4, [k, n], _pack_int4(q), raw=True)
    else:
        weight = numpy_helper.from_array(np.ascontiguousarray(q.astype(np.int8)), base + "_int8")
    scale = numpy_helper.from_array(np.ascontiguousarray(scales.T), base + "_block_scale")  # (K/bs, N)
    model.graph.initializer.extend([weight, scale])
    for name in node.input[1:3]:  # the packed blobs are no longer read
        model.graph.initializer.remove(inits[name])
    w = node.output[0] + "_weight"
    dq = helper.make_node("DequantizeLinear", [weight.name, scale.name], [w], name=node.name + "_dq",
                          axis=0, block_size=bs)
    mm = helper.make_node("MatMul", [node.input[0], w], [node.output[0]], name=node.name + "_matmul")
    extra = []
    if len(node.input) > 5 and node.input[5]:  # bias
        mm.output[0] = node.output[0] + "_nobias"
        extra = [helper.make_node("Add", [mm.output[0], node.input[5]], [node.output[0]], name=node.name + "_bias")]
    return [dq, mm, *extra]
