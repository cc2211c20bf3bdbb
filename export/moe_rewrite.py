"""com.microsoft MoE nodes back into the dense standard-op form, for what cannot take the op.

    MoE(h, router rows, fc1 (E,2I,H), -, fc2 (E,H,I))  ──►  export/moe_graph.py's dense_experts:
                                                            softmax, top-k ranks, E gated MLPs

TensorRT has no such op and `arx calibrate` quantizes 2-D MatMul weights, so `arx build` and
`arx calibrate` rewrite an "op" bundle's experts to exactly the graph `arx export --moe dense`
writes (same emitter, same weight names `layers.{i}.mlp.experts.{e}.*_proj.weight`), with the
router MatMul left as it was. Only the node arx emits is understood (SwiGLU, interleaved fc1, no
biases); anything else is refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from arx.errors import ArxError
from arx.export.decoder_graph import _ffn
from arx.export.graph_ir import Editor, edit_proto, initializer_array, sort_and_prune
from arx.export.moe_graph import MOE_OP, Routing, dense_experts, split_fc1
from arx.export.weights import Expert


class _Emitter(Editor):
    """An Editor that also has what the dense emitter asks of a GraphBuilder: weight(), and
    float constants in the graph's float type (fp16/bf16 bundles)."""

    def __init__(self, graph: ir.Graph, float_dtype: np.dtype, float_type: int):
        super().__init__(graph, prefix="moe")
        self.float_dtype, self.float_type = float_dtype, float_type

    def fresh(self, hint: str) -> str:  # the names --moe dense gives, where free
        if hint in self._taken:
            return super().fresh(hint)
        self._taken.add(hint)
        return hint

    def weight(self, name: str, array: np.ndarray) -> ir.Value:
        return self.initializer(self.fresh(name), array)

    def const(self, value, dtype=np.int64) -> ir.Value:
        return super().const(value, self.float_dtype if np.dtype(dtype).kind == "f" else dtype)

    def matmul(self, x, weight_name: str, array: np.ndarray, name: str,
               output: str | None = None) -> ir.Value:
        """x @ array (K, N), as GraphBuilder.matmul emits an unquantized linear: the dense
        experts stay float here (arx build's precision pass and calibrate take them from there)."""
        w = self.weight(weight_name, array)
        return self.node("MatMul", [x, w], [output] if output else 1, name=name)[0]


QMOE_OP = (MOE_OP[0], "QMoE")  # a calibrated bundle's (calibration/moe_quant.py)


def densify_moe(model: onnx.ModelProto) -> int:
    """densify_ir on a ModelProto (arx calibrate's), rewritten in place; returns how many."""
    if not any((n.domain, n.op_type) in (MOE_OP, QMOE_OP) for n in model.graph.node):
        return 0  # nothing to rewrite: no round trip through the IR (a copy of every weight)
    return edit_proto(model, densify_ir)


def densify_ir(model: ir.Model) -> int:
    """Rewrite every MoE node of `model` (weights loaded) in place; returns how many. A w4/w8
    bundle's QMoE nodes come back with their weights dequantized to float."""
    graph = model.graph
    nodes = [n for n in graph if (n.domain, n.op_type) in (MOE_OP, QMOE_OP)]
    ed = None
    for n in nodes:
        spec, experts = _parse(graph, n)
        if ed is None:  # constants in the graph's float type: the node's output's
            dtype = experts[0].up[0].dtype
            ed = _Emitter(graph, dtype, ir.DataType.from_numpy(dtype).value)
        # on the node's token rows (N,H) and router rows (N,E): every dense op is per row
        prefix = n.name.removesuffix(".moe") if n.name.endswith(".moe") else ed.fresh("mlp")
        out = dense_experts(ed, spec, n.inputs[1], experts, n.inputs[0], _ffn, prefix)
        ed.node("Identity", [out], [n.outputs[0].name], name=f"{prefix}.experts_sum")
        graph.remove(n, safe=True)
    if nodes:  # drops fc1/fc2 and the row reshapes; every graph input stays
        sort_and_prune(model, keep_inputs=[v.name for v in graph.inputs])
    return len(nodes)


def _parse(graph: ir.Graph, n: ir.Node) -> tuple[Routing, list[Expert]]:
    attrs = {name: a.value for name, a in n.attributes.items()}
    act = attrs.get("activation_type", b"relu")
    act = act.decode() if isinstance(act, bytes) else act
    ins = [v.name if v is not None else "" for v in n.inputs]
    ins += [""] * (20 - len(ins))
    quantized = n.op_type == QMOE_OP[1]
    extra = [4, *range(7, 20)] if quantized else [3, 5, 6, 7]  # biases, fc3, zero points, ...
    plain = (act == "swiglu" and attrs.get("swiglu_fusion") == 1 and not any(ins[i] for i in extra)
             and attrs.get("activation_alpha", 1.0) == 1.0
             and attrs.get("activation_beta", 0.0) == 0.0 and attrs.get("swiglu_limit", 1e30) >= 1e30
             and not attrs.get("use_sparse_mixer", 0)
             and attrs.get("quant_type", b"int") in (b"int", "int"))
    if quantized and plain:
        from arx.calibration.moe_quant import dequantize_qmoe

        fc1, fc2 = dequantize_qmoe(n)
    else:
        fc1, fc2 = initializer_array(graph, ins[2]), initializer_array(graph, ins[4])
    if not plain or fc1 is None or fc2 is None:
        raise ArxError(f"MoE node {n.name!r} is not the form arx exports (SwiGLU experts, "
                       f"interleaved fc1 weights, no biases); re-export the bundle with arx export "
                       f"--moe dense")
    experts = []
    for e in range(fc1.shape[0]):
        gate, up = split_fc1(fc1[e])  # (I, H) each: (out, in) -> MatMul's (in, out)
        experts.append(Expert((np.ascontiguousarray(gate.T), None), (np.ascontiguousarray(up.T), None),
                              (np.ascontiguousarray(fc2[e].T), None)))
    spec = Routing(num_experts=fc1.shape[0], experts_per_token=int(attrs["k"]),
                   norm_topk_prob=bool(attrs.get("normalize_routing_weights", 0)))
    return spec, experts
