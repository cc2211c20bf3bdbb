"""Small helpers for rewriting an ONNX graph in place: fresh names, nodes, constants, pruning.

Used by export (the general-step graph, export/step_graph.py) and by builder/ (TensorRT forms).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphEditor:
    """Appends nodes and constants to `graph`, naming every value uniquely."""

    def __init__(self, graph: onnx.GraphProto, prefix: str = "trt"):
        self.graph = graph
        self.prefix = prefix
        self._taken = {v for n in graph.node for v in (*n.input, *n.output)}
        self._taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
        self._taken |= {n.name for n in graph.node}
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        name, k = f"{self.prefix}/{hint}", 0
        while name in self._taken:
            k += 1
            name = f"{self.prefix}/{hint}_{k}"
        self._taken.add(name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.graph.initializer.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1,
             domain: str = "", name: str | None = None, **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{name or op}/out{j}") for j in range(outputs)]
        self.graph.node.append(helper.make_node(op, list(inputs), list(outputs),
                                                name=self.fresh(name or op), domain=domain, **attrs))
        return list(outputs)

    def op(self, op: str, *inputs: str, name: str | None = None, **attrs) -> str:
        return self.node(op, inputs, 1, name=name, **attrs)[0]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def initializer(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before use (appended nodes may break order)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in ready})[:5]
            raise ValueError(f"graph has a cycle or dangling inputs: {missing}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def prune(graph: onnx.GraphProto, keep_inputs: Iterable[str] = ()) -> None:
    """Drop nodes whose outputs nothing uses, then unused initializers and graph inputs.

    Needs topologically sorted nodes (one backward sweep).
    """
    live = {o.name for o in graph.output}
    kept = []
    for n in reversed(list(graph.node)):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(i for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    keep = set(keep_inputs)
    inputs = [i for i in graph.input if i.name in live or i.name in keep]
    del graph.input[:]
    graph.input.extend(inputs)
