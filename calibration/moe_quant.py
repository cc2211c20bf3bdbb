"""w4 / w8 of the experts of an `arx export --moe op` bundle: each com.microsoft MoE node becomes
com.microsoft QMoE over the same integers MatMulNBits would hold.

    MoE(x, rows, fc1 (E,2I,H) float, -, fc2 (E,H,I) float)
        ──► QMoE(x, rows, fc1 uint8 (E,2I,H*bits/8), scales (E,2I,H/bs), -, fc2 (E,H,I*bits/8),
                 scales (E,H,I/bs); expert_weight_bits, block_size=bs, accuracy_level)

Each expert's (out, in) matrix is quantized as ORT's MatMulNBitsQuantizer quantizes a linear
(its C++ block quantizer, symmetric: code - 8 for 4 bits, - 128 for 8, one scale per block of
`bs` inputs), so QMoE's rows are MatMulNBits' blobs laid end to end. On ORT 1.31 CPU (measured,
docs/design.md) a decode step's QMoE reads only the k chosen experts: 4-bit at the Mixtral
benchmark's layer shape took 0.3-0.7 ms against 1.5 ms for the 8 experts as MatMulNBits.
QMoE needs a power-of-two block >= 16 dividing H and I, and renormalised routing (qmoe_fits);
where that fails, the calibrator takes the dense form instead (export/moe_rewrite.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from arx.calibration.weight_only import _unpack
from arx.export.moe_graph import MOE_OP

QMOE = "QMoE"
_ZERO = {4: 8, 8: 128}  # the symmetric codes' zero


def _moe_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if (n.domain, n.op_type) == MOE_OP]


def qmoe_fits(model: onnx.ModelProto, block: int) -> bool:
    """True when there are MoE nodes, each renormalising its k weights (QMoE's
    normalize_routing_weights=0 on ORT 1.31 CPU is not MoE's softmax over all E: up to 2.4 off
    the dequantized dense form, so Qwen3-MoE without norm_topk_prob stays dense), and each
    one's fc1/fc2 can be blocked by `block`."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes = _moe_nodes(model)
    ok = block >= 16 and block & (block - 1) == 0 and all(
        helper.get_attribute_value(a) == 1 for n in nodes for a in n.attribute
        if a.name == "normalize_routing_weights")
    return bool(nodes) and ok and all(shapes[n.input[2]][2] % block == 0
                                      and shapes[n.input[4]][2] % block == 0 for n in nodes)


def quantize_moe(model: onnx.ModelProto, *, bits: int, block: int, accuracy_level: int) -> int:
    """Rewrite every MoE node of `model` (weights loaded) to QMoE in place; returns how many."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = _moe_nodes(model)
    for n in nodes:
        ins = list(n.input)
        for slot in (2, 4):  # fc1, fc2: (E, N, K) -> packed (E, N, K*bits/8), scales (E, N, K/bs)
            w = numpy_helper.to_array(inits[ins[slot]]).astype(np.float32)
            packed, scales = zip(*(_block_quant(w[e], bits, block) for e in range(w.shape[0])))
            graph.initializer.remove(inits[ins[slot]])
            graph.initializer.extend([numpy_helper.from_array(np.stack(packed), ins[slot] + "_q"),
                                      numpy_helper.from_array(np.stack(scales), ins[slot] + "_scales")])
        attrs = [a for a in n.attribute]
        q = helper.make_node(QMOE, [ins[0], ins[1], ins[2] + "_q", ins[2] + "_scales", "",
                                    ins[4] + "_q", ins[4] + "_scales"], list(n.output),
                             name=n.name, domain=n.domain, expert_weight_bits=bits,
                             block_size=block, accuracy_level=accuracy_level)
        q.attribute.extend(attrs)
        graph.node.insert(list(graph.node).index(n), q)
        graph.node.remove(n)
    return len(nodes)


def _block_quant(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One (N, K) (out, in) matrix -> codes (N, K*bits/8) uint8, scales (N, K/block)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    blocks = k // block
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero = np.zeros((n, (blocks + 8 // bits - 1) // (8 // bits)), np.uint8)  # unused: symmetric
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(w.T), scales, zero, block, n, k, True)
    return packed.reshape(n, -1), scales


def dequantize_qmoe(node) -> tuple[np.ndarray, np.ndarray]:
    """A QMoE node's (an onnx_ir Node, its weights initializers) fc1 (E,2I,H) and fc2 (E,H,I)
    back in float (the TensorRT forms: export/moe_rewrite.py)."""
    attrs = {name: a.value for name, a in node.attributes.items()}
    bits, block = int(attrs.get("expert_weight_bits", 4)), int(attrs["block_size"])
    out = []
    for w_in, s_in in ((2, 3), (5, 6)):
        codes = node.inputs[w_in].const_value.numpy()
        scales = node.inputs[s_in].const_value.numpy().astype(np.float32)
        e, n, blocks = scales.shape
        k = blocks * block
        w = np.stack([_unpack(codes[x], bits, k, n, blocks) for x in range(e)]).astype(np.float32)
        w = (w - _ZERO[bits]).reshape(e, n, blocks, block) * scales[..., None]
        out.append(w.reshape(e, n, k))
    return out[0], out[1]
