"""The bundle's general-step graph: any width, ragged rows, after a past, causal or block mask.

decoder.onnx (GroupQueryAttention) stays the fast path for what that op does right on ORT CPU:
a prefill with no past (ragged, right-padded) and single-token decode, at any batch. It refuses
a multi-token step with a past at batch > 1 ("batch_size must be 1 when sequence_length > 1 and
past context is given", ORT 1.31) and has no block mask. decoder_step.onnx is the same graph
with every attention node rewritten to ONNX TensorScatter + Attention (export/attention_rewrite.py,
the emitter of `arx build --attention native`), and per-row lengths given explicitly:

    past_lengths (B,) ─────────────┬──► TensorScatter write index, positions = past + Range(S)
    new_lengths (B,) ─ Add(past) ──┴──► total: Attention nonpad_kv_seqlen, block-mask key bound
    block_mask (B,) ─Cast bool──────────► per row: causal (0) or block (1) mask
    total ─ReduceMax─Range─► key positions 0..T-1 (T: the longest row's total): Attention
        reads only the cache's first T entries (a Slice of each layer's buffer), not all of it

It holds no weights of its own: its initializers point into decoder.onnx.data (written first),
so the bundle stores them once, and the runtime opens it only when a step needs it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

from arx.export.attention_rewrite import (GQA, NATIVE_OPSET, Bookkeeping, parse_gqa,
                                          rewrite_attention_native)
from arx.export.graph import DTYPES
from arx.export.graph_ir import Editor, from_proto, sort_and_prune, to_proto
from arx.manifest import KVLayout, Stage, TensorSpec
from arx.runtime.decoder import LENGTH_INPUTS  # the feeds the runtime builds for this graph
from arx.runtime.decoder import STEP_GRAPH as EXTENSION

STEP_FILE = "decoder_step.onnx"
STEP_STAGE = "decoder_step"  # manifest.stages key


def step_io(decoder: Stage) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The step graph's IO: the decoder's, attention_mask replaced by per-row lengths."""
    batch = decoder.inputs[0].shape[0]  # input_ids or inputs_embeds
    inputs = [t for t in decoder.inputs if t.name != "attention_mask"]
    at = 1 + ("position_ids" in {t.name for t in inputs})  # after input_ids (and position_ids)
    lengths = [TensorSpec(n, "int64", (batch,)) for n in LENGTH_INPUTS]
    return inputs[:at] + lengths + inputs[at:], list(decoder.outputs)


def build_step_graph(decoder_model: onnx.ModelProto, decoder: Stage, kv: KVLayout,
                     file: str = STEP_FILE) -> tuple[onnx.ModelProto, Stage]:
    """Rewrite the (saved, weights-external) decoder into the general-step graph; the decoder's
    proto is left as it was (its weights stay external references into its data file)."""
    model = from_proto(decoder_model)
    graph = model.graph
    ed = Editor(graph, prefix="step")
    inputs, outputs = step_io(decoder)
    graph.inputs.extend(ed.typed(n, DTYPES["int64"], ["batch_size"]) for n in LENGTH_INPUTS)
    bk = _bookkeeping(ed, kv, decoder.inputs[0].name)
    masks: dict = {}
    rope: dict = {}
    for n in [n for n in graph if (n.domain, n.op_type) == GQA]:
        rewrite_attention_native(ed, parse_gqa(n), kv.head_dim, bk, rope, masks)
        graph.remove(n, safe=True)
    sort_and_prune(model)  # the mask bookkeeping (and attention_mask with it) goes
    typed = [ed.typed(t.name, DTYPES[t.dtype], t.shape) for t in inputs]
    graph.inputs.clear()  # in the manifest's order
    graph.inputs.extend(typed)
    # the other domains stay (com.microsoft: MatMulNBits, ...)
    kept = {d: v for d, v in model.opset_imports.items() if d not in ("", "ai.onnx")}
    model.opset_imports.clear()
    model.opset_imports.update({"": NATIVE_OPSET, **kept})
    return to_proto(model), Stage(file, tuple(inputs), tuple(outputs))


def _bookkeeping(ed: Editor, kv: KVLayout, tokens: str) -> Bookkeeping:
    """Per-row lengths, positions and key positions from the explicit length inputs.

        positions (B,S) = Min(past[:,None] + Range(0,S), max_seq_len-1)   (padding stays in
        the RoPE tables' range)        keys (T,) = Range(0, T), T = max(past + new, 1)
    """
    past, new = LENGTH_INPUTS[:2]
    total = ed.op("Add", past, new, name="seq/total")
    s = ed.op("Gather", ed.op("Shape", tokens, name="seq/ids_shape"), ed.const(1), axis=0,
              name="seq/S")
    steps = ed.op("Range", ed.const(0), s, ed.const(1), name="seq/steps")  # (S,)
    pos = ed.op("Add", ed.op("Unsqueeze", past, ed.const([1])), steps, name="seq/pos")
    pos = ed.op("Min", pos, ed.const(kv.max_seq_len - 1), name="seq/positions")
    # the keys any row reads: the longest row's total, at least 1 (a step of empty rows); (1,)
    # as the Slice ends it is, and as Range reads it (Editor constants are 1-D, as here)
    used = ed.op("Max", ed.op("ReduceMax", total, keepdims=1, name="seq/longest"),
                 ed.const([1]), name="seq/T")
    keys = ed.op("Range", ed.const(0), used, ed.const(1), name="seq/keys")  # (T,)
    block = ed.op("Cast", LENGTH_INPUTS[2], to=onnx.TensorProto.BOOL, name="seq/block")
    return Bookkeeping(past, new, pos, kv.max_seq_len, new_len64=new, past_len64=past,
                       total64=total, keys=keys, block=block, keys_end=used)


def weights_fingerprint(decoder_file: Path) -> str:
    """sha256 of decoder.onnx (the graph, with its tensors' offsets into the data file): a
    bundle whose decoder was re-saved (calibrated) no longer matches the step graph's weights."""
    return hashlib.sha256(Path(decoder_file).read_bytes()).hexdigest()


def save_step_graph(model: onnx.ModelProto, stage: Stage, bundle: Path, decoder: Stage) -> dict:
    """Write the step graph (weights stay in the decoder's data file); return the manifest
    section that ties it to that decoder."""
    onnx.save_model(model, str(Path(bundle) / stage.file))
    return {"stage": STEP_STAGE, "weights_of": decoder.file,
            "sha256": weights_fingerprint(Path(bundle) / decoder.file)}


def rebuild_step_graph(bundle: Path, decoder: Stage, kv: KVLayout, file: str = STEP_FILE) -> dict:
    """Write the step graph anew over the bundle's (re-saved, e.g. calibrated) decoder; return
    the manifest section (its tensors are references into the new decoder's data file)."""
    model = onnx.load(str(Path(bundle) / decoder.file), load_external_data=False)
    step_model, stage = build_step_graph(model, decoder, kv, file)
    return save_step_graph(step_model, stage, bundle, decoder)
