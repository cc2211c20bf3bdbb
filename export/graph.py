"""A small helper for emitting ONNX graphs node by node (names, initializers, IO)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arx.export.external_data import ExternalDataWriter, tensor_proto, to_proto_array
from arx.export.tensor_source import contiguous

# onnxruntime 1.31 loads IR version <= 13 models; onnx 1.23 would write 14 by default.
IR_VERSION = 10
OPSET = 23  # RMSNormalization, Gelu(approximate)
MS_DOMAIN = "com.microsoft"

DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "int8": TensorProto.INT8,
    "bool": TensorProto.BOOL,
}


class GraphBuilder:
    """Collects nodes, initializers and IO; names every value uniquely.

    float_dtype: the dtype every float weight and constant is emitted in (the bundle's
    activations follow it); writer: where large initializers go as they are added (the graph
    then holds references only), None to keep them in the proto."""

    def __init__(self, name: str, float_dtype: str = "float32",
                 writer: ExternalDataWriter | None = None, quantizer=None):
        self.name, self.float_dtype, self.writer = name, float_dtype, writer
        self.quantizer = quantizer  # export/quantized_export.EmitQuantizer: linears as MatMulNBits
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        # quantized head -> (its table's Gather in self.nodes, the table's shape): embedding()
        self._head_readers: dict[str, tuple[int, tuple[int, int]]] = {}

    @property
    def float_type(self) -> int:
        """The TensorProto type of the graph's floats (for Cast nodes)."""
        return DTYPES[self.float_dtype]

    def fresh(self, hint: str) -> str:
        n = self._counts.get(hint, 0)
        self._counts[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def input(self, name: str, dtype: str, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, DTYPES[dtype], list(shape)))
        return name

    def output(self, name: str, dtype: str, shape: Sequence[int | str]) -> None:
        """Declare the value `name` (produced by some node) as a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, DTYPES[dtype], list(shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array, data_type = to_proto_array(array, self.float_dtype)
        else:
            data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        self.initializers.append(self.writer.add(name, array, data_type) if self.writer
                                 else tensor_proto(name, array, data_type))
        return name

    def quantizes(self, name: str) -> bool:
        """Whether MatMul `name` is emitted quantized (--quantize)."""
        return self.quantizer is not None and self.quantizer.takes(name)

    def matmul(self, x: str, weight_name: str, array: np.ndarray, name: str,
               output: str | None = None) -> str:
        """x @ array (K, N) as MatMul `name`; where the quantizer takes it, the weight is
        quantized now (MatMulNBits) and its float bytes are never written."""
        if not self.quantizes(name):
            w = self.weight(weight_name, contiguous(array))
            return self.node("MatMul", [x, w], [output] if output else 1, name=name)[0]
        out = output or self.fresh(f"{name}/out")  # the names node() would give
        node = helper.make_node("MatMul", [x, weight_name], [out], name=self.fresh(name))
        nodes, tensors = self.quantizer.quantize(node, array)
        self._add_quantized(nodes, tensors)
        if name in self._head_readers:
            self._read_head_codes(name, nodes)
        return out

    def embedding(self, table_name: str, table: np.ndarray, ids: str, *, head: str | None,
                  name: str = "embed") -> str:
        """Gather(table (V, H), ids) as node `name`. Where the quantizer takes the table (w4,
        w8), GatherBlockQuantized, the float bytes never written: over codes of its own, or, for a
        table tied LM head MatMul `head` reads, over the head's codes once matmul() has
        quantized them (the Gather waits in the node list until then)."""
        form = "float" if self.quantizer is None else \
            self.quantizer.embedding_form(table_name, head, table.shape[1])
        if form == "float":
            return self.op("Gather", self.weight(table_name, table), ids, name=name)
        out = self.fresh(f"{name}/out")
        node = helper.make_node("Gather", [table_name, ids], [out], name=self.fresh(name))
        if form == "head":
            self._head_readers[head] = (len(self.nodes), table.shape)
            self.nodes.append(node)
        else:
            self._add_quantized(*self.quantizer.quantize_embedding(node, table))
        return out

    def _read_head_codes(self, head: str, nodes: list[onnx.NodeProto]) -> None:
        """The Gather waiting for quantized head `head` (embedding) now reads its codes."""
        from arx.calibration.embedding_quant import head_codes_embedding

        at, shape = self._head_readers.pop(head)
        gather = self.nodes[at]
        (matmul,) = [n for n in nodes if n.op_type == "MatMulNBits"]
        made = head_codes_embedding(matmul, gather, shape)
        if made is None:  # embedding_form promised the head's codes would do
            raise RuntimeError(f"{head}'s codes cannot be read by {gather.name}: an arx bug")
        self.nodes[at:at + 1] = made[0]
        self._add_quantized([], made[1])

    def _add_quantized(self, nodes: list[onnx.NodeProto], tensors: list[onnx.TensorProto]) -> None:
        """A quantizer's nodes and initializers, the initializers to the writer where there is
        one (packed int4 codes as their raw bytes under their logical dims)."""
        for t in tensors:
            if self.writer is None:
                self.initializers.append(t)
            elif t.data_type in (TensorProto.INT4, TensorProto.UINT4):
                self.initializers.append(self.writer.add(t.name, np.frombuffer(t.raw_data, np.uint8),
                                                         t.data_type, dims=list(t.dims)))
            else:
                self.initializers.append(self.writer.add(t.name, numpy_helper.to_array(t), t.data_type))
        self.nodes.extend(nodes)

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer, shared between uses of the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), arr)
        return self._consts[key]

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1,
             domain: str = "", name: str | None = None, **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{name or op}/out{j}" if outputs > 1 else f"{name or op}/out")
                       for j in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs),
                                           name=self.fresh(name or op), domain=domain, **attrs))
        return list(outputs)

    def op(self, op: str, *inputs: str, domain: str = "", name: str | None = None, **attrs) -> str:
        """Single-output node; returns its output name."""
        return self.node(op, inputs, 1, domain=domain, name=name, **attrs)[0]

    def model(self, opset: int = OPSET) -> onnx.ModelProto:
        if self._head_readers:
            raise RuntimeError(f"embedding Gathers wait for heads never emitted: "
                               f"{sorted(self._head_readers)} (an arx bug)")
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=self.initializers)
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="arx")
        model.ir_version = IR_VERSION
        return model


def save_with_external_data(model: onnx.ModelProto, path, data_name: str) -> None:
    """Save weights to one external data file beside the graph (needed past 2 GB anyway)."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
