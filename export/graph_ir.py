"""arx's graph rewrites over onnx_ir: every pass (export/step_graph.py, kv_dtype.py,
moe_rewrite.py, builder/'s TensorRT forms) edits one IR with use lists.

onnx_ir gives the IR itself (ir.from_proto / ir.to_proto), use lists (Value.uses(),
Value.producer()), replace_all_uses_with, the topological sort and dead-code removal
(TopologicalSortPass, RemoveUnusedNodesPass). What is arx's here:
  - names: every new node and value is `prefix/hint` (made unique with _1, _2, ...), since
    restore_decoder finds the "kv/" casts by name and engine layer names are what a TensorRT
    profile shows; onnx_ir's own naming (val_12) says nothing about where a value came from
  - constants deduplicated per editor (one initializer per distinct int64 vector)
  - values looked up by name, so the emitters name graph IO ("logits", "past_lengths") as text;
    an output given an existing value's name takes that value's place (its uses, its graph
    output slot; a graph input of that name is dropped), as when a node is replaced
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar, Union

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

# the passes log each run at INFO ("Removed 8 unused nodes"), which reaches a user's terminal
# wherever logging is configured (a benchmark, a notebook): not news to them
logging.getLogger("onnx_ir.passes").setLevel(logging.WARNING)

SKELETON_DATA = "skeleton.data"  # skeleton()'s external location: never read
ValueLike = Union[ir.Value, str, None]  # a value, its name, or "" / None for a missing input
T = TypeVar("T")


def from_proto(model: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The ModelProto, without the value_info onnx_ir writes for every initializer: the tensor
    already has its type and shape, and a second copy goes stale when a pass retypes it."""
    _untype_initializers(model)
    return ir.to_proto(model)


def load(path: Path) -> ir.Model:
    """The model at `path` with its external data left on disk: a tensor's bytes are read
    (memory-mapped) only when a pass asks for its values, or when save() writes it."""
    return ir.load(str(path))


def save(model: ir.Model, path: Path, data: str) -> None:
    """`path` and its tensors over 1 kB in the file `data` beside it, written tensor by tensor
    (lazy ones evaluated one at a time): no 2 GB protobuf limit, no copy of the whole model."""
    _untype_initializers(model)
    written: list[ir.TensorProtocol] = []

    def unmap_the_last(tensor: ir.TensorProtocol, _info) -> None:  # called before each write
        while written:
            unmap(written.pop())
        written.append(tensor)

    ir.save(model, str(path), external_data=data, size_threshold_bytes=1024,
            callback=unmap_the_last)
    for tensor in written:
        unmap(tensor)


def unmap(tensor: ir.TensorProtocol) -> None:
    """Close a tensor's memory map once its bytes are written or converted: each ExternalTensor
    maps the whole data file and keeps the pages it read resident (a 5 GB bundle's form held
    them all by the end of its save). It maps again if read later."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # a view of its bytes is still alive elsewhere: keep the map
            pass


def skeleton(model: ir.Model) -> onnx.ModelProto:
    """The ModelProto with every initializer over 1 kB, and every one still on disk, as a
    reference to an external file that is never read: onnx.checker, shape inference and inspections of a model of any size, without
    reading or copying its weights."""
    def reference(t: ir.TensorProtocol):
        on_disk = isinstance(t, ir.ExternalTensor)  # small ones too: their file is elsewhere
        return None if t.nbytes <= 1024 and not on_disk else \
            ir.ExternalTensor(SKELETON_DATA, 0, t.nbytes, t.dtype, shape=t.shape, name=t.name)

    with _tensors_swapped(model, reference):
        return to_proto(model)


def to_proto_in_memory(model: ir.Model) -> onnx.ModelProto:
    """to_proto with the tensors load() left on disk read into the proto (a small model)."""
    def read(t: ir.TensorProtocol):
        return ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name) \
            if isinstance(t, ir.ExternalTensor) else None

    with _tensors_swapped(model, read):
        return to_proto(model)


@contextmanager
def _tensors_swapped(model: ir.Model, swap: Callable[[ir.TensorProtocol], object]):
    """Initializers' tensors replaced by swap(tensor) (where it is not None) for the block."""
    kept = {}
    for value in model.graph.initializers.values():
        new = None if value.const_value is None else swap(value.const_value)
        if new is not None:
            kept[value], value.const_value = value.const_value, new
    try:
        yield
    finally:
        for value, tensor in kept.items():
            value.const_value = tensor


def _untype_initializers(model: ir.Model) -> None:
    inputs = set(model.graph.inputs)
    for value in model.graph.initializers.values():
        if value not in inputs:
            value.type, value.shape = None, None


def edit_proto(model: onnx.ModelProto, edit: Callable[[ir.Model], T]) -> T:
    """edit(the IR of `model`), written back into `model` (for callers that hold a proto)."""
    ir_model = from_proto(model)
    result = edit(ir_model)
    model.CopyFrom(to_proto(ir_model))
    return result


def sort_and_prune(model: ir.Model, keep_inputs: Iterable[str] = ()) -> None:
    """Topological order (appended nodes come last), then drop what no graph output needs:
    nodes, initializers, and graph inputs nothing reads (unless named in keep_inputs)."""
    TopologicalSortPass()(model)
    RemoveUnusedNodesPass()(model)
    keep, graph = set(keep_inputs), model.graph
    live = [v for v in graph.inputs if v.uses() or v.is_graph_output() or v.name in keep]
    graph.inputs.clear()
    graph.inputs.extend(live)


def set_tensor(value: ir.Value, array: np.ndarray) -> None:
    """Give an initializer new data (a retyped weight): the tensor, and the value's type."""
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.type = ir.TensorType(value.const_value.dtype)
    value.shape = value.const_value.shape


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer `name` holding `array`, registered in `graph`."""
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def take_place(old: ir.Value, new: ir.Value) -> None:
    """`new` takes `old`'s place: its readers, its graph output slot, its name, declared type
    and shape (a replaced node's output, a value behind an inserted Cast); `old` is left
    unnamed for the caller to rename or drop."""
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name, old.name = old.name, None
    new.name, new.type, new.shape = name, old.type, old.shape


def initializer_array(graph: ir.Graph, name: str) -> np.ndarray | None:
    value = graph.initializers.get(name)
    return None if value is None or value.const_value is None else value.const_value.numpy()


class Editor:
    """Appends nodes and constants to `graph`, naming every new node and value uniquely."""

    def __init__(self, graph: ir.Graph, prefix: str = "trt"):
        self.graph = graph
        self.prefix = prefix
        self.values: dict[str, ir.Value] = ir.convenience.create_value_mapping(graph)
        self._taken = set(self.values) | {n.name for n in graph if n.name}
        self._consts: dict[tuple, ir.Value] = {}

    def fresh(self, hint: str) -> str:
        name, k = f"{self.prefix}/{hint}", 0
        while name in self._taken:
            k += 1
            name = f"{self.prefix}/{hint}_{k}"
        self._taken.add(name)
        return name

    def value(self, x: ValueLike) -> ir.Value | None:
        if x is None or isinstance(x, ir.Value):
            return x
        return self.values[x] if x else None

    def typed(self, name: str, elem_type: int, shape: Sequence[int | str]) -> ir.Value:
        """The value named `name` (a new one where the graph has none: an input to add), given
        an ONNX element type and a shape (ints, and names for symbolic dims)."""
        value = self.values.get(name)
        if value is None:
            value = self.values[name] = ir.Value(name=name)
            self._taken.add(name)
        value.type = ir.TensorType(ir.DataType(elem_type))
        value.shape = ir.Shape(list(shape))
        return value

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = add_initializer(self.graph, name, array)
        self.values[name] = value
        self._taken.add(name)
        return value

    def const(self, value, dtype=np.int64) -> ir.Value:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(self.fresh("const"), arr)
        return self._consts[key]

    def node(self, op: str, inputs: Sequence[ValueLike], outputs: Sequence[str] | int = 1,
             domain: str = "", name: str | None = None, **attrs) -> list[ir.Value]:
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{name or op}/out{j}") for j in range(outputs)]
        outs = [self._output(o) for o in outputs]
        self.graph.append(ir.node(op, [self.value(i) for i in inputs], attrs, domain=domain,
                                  outputs=outs, name=self.fresh(name or op)))
        return outs

    def op(self, op: str, *inputs: ValueLike, name: str | None = None, **attrs) -> ir.Value:
        return self.node(op, inputs, 1, name=name, **attrs)[0]

    def insert_after(self, value: ir.Value, op: str, name: str, rename: str,
                     **attrs) -> ir.Value:
        """value ─op─► a new value that takes value's place: its readers, its graph output slot,
        its name and its declared type; value itself is renamed `prefix/rename` (the norm's
        fp32 output, the logits before their Cast to fp32), its type left to inference."""
        new = ir.Value()
        take_place(value, new)  # before op reads value
        self.graph.append(ir.node(op, [value], attrs, outputs=[new], name=self.fresh(name)))
        value.name, value.type, value.shape = self.fresh(rename), None, None
        self.values[new.name], self.values[value.name] = new, value
        return new

    @staticmethod
    def feed(uses: Iterable[ir.Usage], new: ir.Value) -> None:
        """The given uses (taken before `new` was made from their value) read `new` instead."""
        for use in uses:
            use.node.replace_input_with(use.idx, new)

    def _output(self, name: str) -> ir.Value:
        new = ir.Value(name=name)
        old = self.values.get(name)
        if old is not None:  # the replaced node's output, or a graph input computed from now on
            if old.is_graph_input():
                self.graph.inputs.remove(old)
            take_place(old, new)  # the same tensor: a graph output keeps its declared type
        self.values[name] = new
        self._taken.add(name)
        return new
