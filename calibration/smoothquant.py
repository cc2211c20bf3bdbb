"""SmoothQuant (Xiao et al. 2023), folded into the ONNX initializers.

Activation outliers sit in a few channels. For a linear y = x W with x (.., K), W (K, N),
per input channel j:

    s_j = max|x_j|^alpha / max_n |W_jn|^(1 - alpha)
    y = (x / s) (diag(s) W)        exact in real arithmetic

x / s is folded into whatever made x, so the graph gains no node:

    norm ──► x ──► MatMul(W_qkv)           norm weight (and LayerNorm bias) /= s
                └► MatMul(W_gate), (W_up)  every consumer's rows      *= s

    MatMul(W_up) [+b] ─► u ─► Mul(act(gate), u) ─► MatMul(W_down)
                             u / s  <=>  W_up columns (and b) /= s;  W_down rows *= s

ORT's own SmoothQuant needs neural-compressor; this is the same transform on the initializers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from arx.calibration.graph import initializers, set_initializer

NORM_OPS = ("RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization")
# Ops that only select rows (positions) of an activation: the final norm reaches the LM head
# through GatherND(logits_indices), and a per-channel scale passes through it unchanged.
ROW_SELECT_OPS = ("GatherND",)
_S_MIN, _S_MAX = 1e-5, 1e5  # keep a dead channel (max|x| = 0) from zeroing weights


@dataclass(frozen=True)
class SmoothGroup:
    name: str  # the node whose output is smoothed (a norm, or the up projection)
    act: str  # the smoothed activation (.., K)
    divide: tuple[tuple[str, int], ...]  # (initializer, axis) divided by s: norm weight/bias, W_up cols
    consumers: tuple[str, ...]  # weights (K, N) of the MatMuls reading `act`; rows *= s
    consumer_nodes: tuple[str, ...]


def find_groups(model: onnx.ModelProto, quantized: set[str]) -> list[SmoothGroup]:
    """Every place a smoothing scale can be folded exactly, with >= 1 quantized consumer."""
    inits = initializers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    uses = {name: len(consumers.get(name, [])) for name in inits}
    producers = {o: n for n in model.graph.node for o in n.output}

    def linear_readers(tensor: str):
        readers = consumers.get(tensor, [])
        if len(readers) == 1 and readers[0].op_type in ROW_SELECT_OPS and readers[0].input[0] == tensor:
            tensor = readers[0].output[0]  # picking rows commutes with per-channel scaling
            readers = consumers.get(tensor, [])
        ok = readers and all(r.op_type == "MatMul" and r.input[0] == tensor and r.input[1] in inits
                             for r in readers)
        return readers if ok and any(r.name in quantized for r in readers) else None

    groups = []
    for n in model.graph.node:
        if n.op_type in NORM_OPS:
            readers = linear_readers(n.output[0])
            params = [p for p in n.input[1:3] if p]
            if readers and all(p in inits and uses[p] == 1 for p in params):
                groups.append(_group(n.name, n.output[0], [(p, 0) for p in params], readers))
        elif n.op_type == "MatMul" and n.input[1] in inits:
            group = _up_group(n, producers, consumers, inits, uses, linear_readers)
            if group:
                groups.append(group)
    return groups


def _group(name, act, divide, readers) -> SmoothGroup:
    return SmoothGroup(name, act, tuple(divide), tuple(r.input[1] for r in readers),
                       tuple(r.name for r in readers))


def _up_group(up, producers, consumers, inits, uses, linear_readers) -> SmoothGroup | None:
    """up: MatMul [+ Add bias] -> Mul(other, u) -> only linears (the gated MLP's down_proj)."""
    if uses[up.input[1]] != 1:
        return None
    out, divide = up.output[0], [(up.input[1], 1)]
    nxt = consumers.get(out, [])
    if len(nxt) == 1 and nxt[0].op_type == "Add" and nxt[0].input[1] in inits:
        if uses[nxt[0].input[1]] != 1:
            return None
        divide.append((nxt[0].input[1], 0))
        out, nxt = nxt[0].output[0], consumers.get(nxt[0].output[0], [])
    if len(nxt) != 1 or nxt[0].op_type != "Mul":
        return None
    mul = nxt[0]
    other = mul.input[1] if mul.input[0] == out else mul.input[0]
    # the other factor must not be u itself (u*u is not linear in u) nor a linear's output
    # (then it is the gate-side Mul of x*sigmoid(x), not the gating product)
    other_src = producers.get(other)
    if other == out or other_src is None or other_src.op_type == "MatMul":
        return None
    readers = linear_readers(mul.output[0])
    return _group(up.name, mul.output[0], divide, readers) if readers else None


def smoothing_scales(model: onnx.ModelProto, groups: list[SmoothGroup],
                     act_max: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """Per group the (K,) scale s from activation maxima and the consumers' weight maxima."""
    inits = initializers(model)
    scales = {}
    for g in groups:
        w_max = np.max([np.abs(numpy_helper.to_array(inits[w])).max(axis=1) for w in g.consumers], axis=0)
        x_max = act_max[g.name].astype(np.float64)
        s = np.power(np.maximum(x_max, 1e-12), alpha) / np.power(np.maximum(w_max, 1e-12), 1 - alpha)
        s = np.where(x_max > 0, s, 1.0)
        scales[g.name] = np.clip(s, _S_MIN, _S_MAX).astype(np.float32)
    return scales


def fold(model: onnx.ModelProto, groups: list[SmoothGroup], scales: dict[str, np.ndarray]) -> None:
    """Apply the scales in place: the float model computes the same function afterwards."""
    inits = initializers(model)
    for g in groups:
        s = scales[g.name]
        for name, axis in g.divide:
            w = numpy_helper.to_array(inits[name])
            set_initializer(model, name, w / (s if axis == 0 or w.ndim == 1 else s[None, :]))
        for name in g.consumers:
            set_initializer(model, name, numpy_helper.to_array(inits[name]) * s[:, None])


def activation_maxima(probe, groups: list[SmoothGroup], samples) -> dict[str, np.ndarray]:
    """Per group the (K,) max |x| over every token of every calibration sample."""
    act_of = {g.name: g.act for g in groups}
    maxima: dict[str, np.ndarray] = {}
    for ids in samples:
        out = probe.run(ids)
        for name, act in act_of.items():
            m = np.abs(out[act]).reshape(-1, out[act].shape[-1]).max(axis=0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    return maxima
