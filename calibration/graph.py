"""ONNX helpers shared by the schemes: find the linears, pick which to quantize, run probes.

A "linear" is a MatMul whose second input is a 2-D float initializer (K, N) in (in, out)
layout, named like its node (`layers.3.mlp.down_proj`); the lm_head is the MatMul named
`lm_head`. Calibration and probing run prefill only, with an empty cache:

    input_ids (1, S), attention_mask (1, S) of ones, past_key_values.{i}.* zeros (1, kv_heads, S, D)

so plain `InferenceSession.run` works (no IO binding): the attention op writes the S new
keys/values into a buffer exactly as long as the sequence.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arx.errors import ArxError
from arx.manifest import Manifest

LM_HEAD = "lm_head"
# Serialized models above this go through a temp file: protobuf cannot hold 2 GB in one message.
_IN_MEMORY_LIMIT = 1_800_000_000


@dataclass(frozen=True)
class Linear:
    node: str  # MatMul node name
    weight: str  # initializer (K, N)
    input: str  # activation (.., K)
    output: str  # (.., N)


def load_decoder(bundle: Path, manifest: Manifest) -> onnx.ModelProto:
    path = Path(bundle) / manifest.decoder.file
    try:
        return onnx.load(str(path), load_external_data=True)
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise ArxError(f"cannot load {path} ({e}); re-export the bundle") from e


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in one external data file beside the graph (as the exporter does).

    Saves a copy: onnx.save_model would turn `model`'s own tensors into external references.
    """
    path = Path(path)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
            return
    raise KeyError(name)


def linears(model: onnx.ModelProto) -> list[Linear]:
    inits = initializers(model)
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            out.append(Linear(n.name, n.input[1], n.input[0], n.output[0]))
    return out


def untie_lm_head(model: onnx.ModelProto) -> bool:
    """Give a tied lm_head its own (H, V) initializer: MatMul(x, lm_head.weight) over a
    transposed copy of the table, in place of the exporter's Reshape -> Gemm(table, transB=1)
    -> Reshape (or earlier bundles' Transpose(table) -> MatMul). The graph is then the one
    `arx export --quantize` writes.

    Quantizers only touch MatMuls with a constant weight. The embedding stays float for the
    Gather; the head gets a quantized copy (V*H/2 bytes at 4 bits), a good trade for speed.
    """
    inits = initializers(model)
    nodes = model.graph.node
    head = next((n for n in nodes if n.name == LM_HEAD), None)
    tied = _tied_head_nodes(model, head, inits)
    if tied is None:
        return False
    table, x, y, gone = tied
    weight = numpy_helper.to_array(inits[table]).T  # (V, H) -> (H, V)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), "lm_head.weight"))
    at = list(nodes).index(head)
    for n in [n for n in nodes if n == head or y in n.output]:  # the head, the Gemm's Reshape
        nodes.remove(n)
    nodes.insert(at, helper.make_node("MatMul", [x, "lm_head.weight"], [y], name=LM_HEAD))
    _drop_unread(model, gone)
    return True


def _tied_head_nodes(model: onnx.ModelProto, head, inits: dict):
    """(table, head input, head output, nodes that go once nothing reads them) of a tied
    `head`, or None."""
    if head is None:
        return None
    producer = {o: n for n in model.graph.node for o in n.output}
    if head.op_type == "MatMul" and head.input[1] not in inits:
        tr = producer.get(head.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            return None
        return tr.input[0], head.input[0], head.output[0], [tr]
    trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
    if head.op_type != "Gemm" or trans_b != 1 or head.input[1] not in inits:
        return None
    rows = producer.get(head.input[0])
    outs = [n for n in model.graph.node if head.output[0] in n.input]
    if rows is None or rows.op_type != "Reshape" or len(outs) != 1 or outs[0].op_type != "Reshape":
        return None
    concat = producer.get(outs[0].input[1])
    shape = [producer.get(i) for i in concat.input] if concat is not None else []
    # the MatMul reads x (B, K, H) and writes the (B, K, V) logits itself
    return head.input[1], rows.input[0], outs[0].output[0], [rows, concat, *shape]


def _drop_unread(model: onnx.ModelProto, candidates) -> None:
    """Remove those of `candidates` (in order) whose outputs nothing reads any more."""
    graph_out = {o.name for o in model.graph.output}
    for n in candidates:
        if n is None or n not in model.graph.node:
            continue
        if not any(o in graph_out or any(o in m.input for m in model.graph.node)
                   for o in n.output):
            model.graph.node.remove(n)


def split_linears(all_linears: list[Linear], keep_fp: Iterable[str], lm_head: bool) -> tuple[list[str], list[str]]:
    """(names to quantize, names kept float). keep_fp entries are node names or prefixes."""
    names = [lin.node for lin in all_linears]
    keep = set() if lm_head else {LM_HEAD}
    for item in keep_fp:
        hits = [n for n in names if n == item or n.startswith(item + ".")]
        if not hits:
            examples = ", ".join(names[:3] + [LM_HEAD])
            raise ArxError(f"--keep-fp {item!r} matches no MatMul of the decoder; use names like "
                           f"{examples} or a layer prefix like layers.0")
        keep.update(hits)
    return [n for n in names if n not in keep], [n for n in names if n in keep]


def add_contrib_output_types(model: onnx.ModelProto) -> None:
    """Declare float outputs of com.microsoft ops (GroupQueryAttention): ONNX shape inference
    does not know them, and ORT's quantizer skips tensors of unknown type (the o_proj input)."""
    known = {v.name for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    for n in model.graph.node:
        if n.domain == "com.microsoft" and n.op_type == "GroupQueryAttention":
            for o in n.output:
                if o and o not in known:
                    model.graph.value_info.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))


def prefill_feeds(manifest: Manifest, ids: np.ndarray, input_names: set[str]) -> dict[str, np.ndarray]:
    """Feeds of one sequence (S,) run as a prefill over an empty cache sized to S."""
    s = len(ids)
    feeds = {"input_ids": ids.reshape(1, s).astype(np.int64)}
    if "attention_mask" in input_names:
        feeds["attention_mask"] = np.ones((1, s), dtype=np.int64)
    if "position_ids" in input_names:
        feeds["position_ids"] = np.arange(s, dtype=np.int64).reshape(1, s)
    if "logits_indices" in input_names:  # logits at every position (perplexity needs them all)
        feeds["logits_indices"] = np.arange(s, dtype=np.int64).reshape(1, s)
    kv = manifest.kv
    for past, _ in kv.pairs():
        feeds[past] = np.zeros((1, kv.kv_heads, s, kv.head_dim), dtype=kv.dtype)  # (B, kv_heads, S, D)
    return feeds


def embedded_feeds(manifest: Manifest, embed):
    """Probe feeds for a decoder that takes inputs_embeds: prefill_feeds with the sample's ids
    through `embed` ((1, S) ids -> (1, S, H), the bundle's embed stage)."""
    def feeds(ids: np.ndarray, input_names: set[str]) -> dict[str, np.ndarray]:
        out = prefill_feeds(manifest, ids, input_names)
        out["inputs_embeds"] = embed(out.pop("input_ids"))
        return out

    return feeds


class Probe:
    """A CPU session of `model` that also returns the intermediate tensors `names`."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str], manifest: Manifest, workdir: Path,
                 feeds=None):
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        outputs = {o.name for o in probe.graph.output}
        self.names = list(dict.fromkeys(names))  # may include graph outputs (lm_head -> logits)
        for n in self.names:
            if n not in outputs:
                probe.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if probe.ByteSize() < _IN_MEMORY_LIMIT:
            source = probe.SerializeToString()
        else:
            # a folder of its own: another probe's session may still map its data file
            source = str(Path(tempfile.mkdtemp(prefix="probe-", dir=workdir)) / "probe.onnx")
            save_model(probe, Path(source))
        self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        self.manifest = manifest
        self.inputs = {i.name for i in self.session.get_inputs()}
        # (sample, input names) -> feeds; default: a sample is one sequence (S,), prefilled
        self.feeds = feeds or (lambda ids, names: prefill_feeds(manifest, ids, names))

    def run(self, sample) -> dict[str, np.ndarray]:
        """The probed tensors for one sample."""
        values = self.session.run(self.names, self.feeds(sample, self.inputs))
        return dict(zip(self.names, values))


def pack_parallel_linears(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Merge MatMuls of `names` that read the same input (gate and up) into one; return the new
    list of names. In place, exact in fp32:

        x ─┬─ MatMul(W_gate) ─► g          x ─ MatMul([W_gate | W_up]) ─ Split(-1) ─┬─► g
           └─ MatMul(W_up)   ─► u                                                   └─► u

    Why: ORT CPU fuses DequantizeLinear->MatMul into MatMulIntegerToFloat only when the
    activation's DQ feeds a single MatMul; with two readers it dequantizes both weights every
    step. One GEMM is also what TensorRT prefers. Output names are kept, so probes still work.
    """
    inits = initializers(model)
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.name in names:
            by_input.setdefault(n.input[0], []).append(n)
    renamed = {}
    for group in by_input.values():
        if len(group) < 2:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
        packed = "+".join([group[0].name] + [n.name.rsplit(".", 1)[-1] for n in group[1:]])
        model.graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), packed + ".weight"))
        sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], dtype=np.int64), packed + ".split")
        model.graph.initializer.append(sizes)
        mm = helper.make_node("MatMul", [group[0].input[0], packed + ".weight"], [packed + "/out"], name=packed)
        split = helper.make_node("Split", [packed + "/out", sizes.name], [n.output[0] for n in group],
                                 name=packed + ".split", axis=-1)
        at = list(model.graph.node).index(group[0])
        for n in group:
            model.graph.node.remove(n)
            model.graph.initializer.remove(inits[n.input[1]])
            renamed[n.name] = packed
        model.graph.node.insert(at, split)
        model.graph.node.insert(at, mm)
    return list(dict.fromkeys(renamed.get(n, n) for n in names))
