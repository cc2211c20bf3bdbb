"""The decoder's TensorRT form: the bundle graph rewritten for a TensorRT engine.

    bundle decoder.onnx (ORT form)                 TensorRT form
    ─────────────────────────────                  ─────────────────────────────────────────
    com.microsoft GroupQueryAttention        ──►   RoPE (standard ops) + arx::kv_attention
                                                   (local_window_size -> window), or with
                                                   attention "native": ONNX TensorScatter +
                                                   Attention (export/attention_rewrite.py)
    com.microsoft MoE (--moe op bundles)     ──►   every expert in standard ops, as --moe dense
                                                   exports them (export/moe_rewrite.py)
    cache (B, kv_heads, past, D), dynamic    ──►   static cache (B, kv_heads, S_max, D),
                                                   present.i.* aliased to past_key_values.i.*
    logits (B, S, V)                         ──►   last_logits (B, V) fp32 [or all / none]
                                                   + arx::sample (or ArgMax) ──► token_ids
                                                   [verify: ArgMax at every position ──►
                                                   verify_ids (B, S), no logits returned]
    fp32 everywhere                          ──►   fp16/bf16 weights + activations, norms and
                                                   returned logits in fp32 (precision.py)

Sequence bookkeeping comes from two per-row inputs, `past_lengths` (B,) (tokens already in
each row's cache) and `new_lengths` (B,) (valid tokens of each row of input_ids, right padding
after), in place of the bundle's `attention_mask`: a mask's row sums give only the total, which
cannot tell a decode row padded into a wider step from a row that adds the whole step. They
also keep every decode step's shapes static for CUDA-graph capture, with no (B, S_max) host mask
copied per token.

In-place cache: the plugin declares outputs 1 and 2 aliased to inputs 3 and 4 (tensorrt.plugin
`aliased()`, builder preview feature ALIASED_PLUGIN_IO_10_03); in the native form TensorScatter
becomes TensorRT's IKVCacheUpdateLayer, whose output shares its cache input's memory. Either way
the engine's present.i.* outputs alias the inputs: the runtime binds each one to the very device
address of its past_key_values.i.* input, and new keys/values are written there; nothing is
copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

from arx.errors import ArxError
from arx.export.attention_rewrite import (GQA, NATIVE_OPSET, Bookkeeping, parse_gqa,
                                          rewrite_attention_native)
from arx.export.graph_ir import Editor, sort_and_prune
from arx.export.moe_rewrite import densify_ir
from arx.manifest import Manifest, Stage, TensorSpec

from .attention import rewrite_attention
from .image_form import IMAGE_ROWS, check_image_form, image_sampler, sampler_logits
from .schemas import DOMAIN, OPSET, SAMPLE, plugin_attrs, register_schemas

ONNX_OPSET = 23  # RMSNormalization; TensorRT 11's parser reads up to opset 25
TOKEN_IDS, LAST_LOGITS, LOGITS = "token_ids", "last_logits", "logits"
VERIFY_IDS = "verify_ids"  # --logits verify: (B, S) int32, each position's greedy token
LOGITS_INDICES = "logits_indices"  # a bundle input; computed inside the TensorRT form
MASK = "attention_mask"  # a bundle input; replaced by the two per-row lengths below
PAST_LENGTHS, NEW_LENGTHS = "past_lengths", "new_lengths"  # (B,) int64 each
# Sampler inputs (arx::sample contract, plugins/sampling/reference.py), per batch row.
#   name -> (dtype, trailing dims; "V" is the vocabulary size)
SAMPLER_INPUTS = {
    "sampling_params": ("float32", (5,)),  # temperature, top_k, top_p, repetition_penalty, cfg
    "presence": ("bool", ("V",)),  # tokens seen so far (repetition penalty)
    "seed": ("int64", ()),  # Philox key per row
    "offset": ("int64", ()),  # Philox counter per row, bumped by the runtime every step
    "row": ("int64", ()),  # Philox row term per row: arange (text), zeros (images drawn alone)
}
_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
          "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
          "int32": onnx.TensorProto.INT32, "bool": onnx.TensorProto.BOOL,
          "int8": onnx.TensorProto.INT8}  # an int8 KV cache (builder/kv_form.py)


@dataclass(frozen=True)
class FormSpec:
    """What the TensorRT form contains (derived from BuildOptions)."""

    s_max: int  # static cache length
    cache_dtype: str = "float32"
    sampler: str = "plugin"  # "plugin" (arx::sample) | "argmax" | "none"
    logits: str = "last"  # "last" | "all" | "none"
    aot: bool = True
    attention: str = "plugin"  # "plugin" (arx::kv_attention) | "native" (ONNX Attention)

    @property
    def opset(self) -> int:
        return NATIVE_OPSET if self.attention == "native" else ONNX_OPSET


def tensorrt_io(manifest: Manifest, spec: FormSpec) -> Stage:
    """IO of the TensorRT form, derived from the manifest's decoder stage (never re-typed)."""
    kv, dec = manifest.kv, manifest.decoder
    pasts = {p for p, _ in kv.pairs()}
    presents = {q for _, q in kv.pairs()}
    batch = dec.inputs[0].shape[0]

    def cache(t: TensorSpec) -> TensorSpec:  # (B, kv_heads, S_max, D)
        return TensorSpec(t.name, spec.cache_dtype, (t.shape[0], kv.kv_heads, spec.s_max, kv.head_dim))

    inputs = [cache(t) if t.name in pasts else t for t in dec.inputs
              if t.name not in (LOGITS_INDICES, MASK)]
    inputs[1:1] = [TensorSpec(PAST_LENGTHS, "int64", (batch,)),
                   TensorSpec(NEW_LENGTHS, "int64", (batch,))]
    outputs: list[TensorSpec] = []
    codebook = image_sampler(manifest)  # images: one sampler row per [cond; null] pair
    v, rows = (codebook.size, IMAGE_ROWS) if codebook else (manifest.vocab_size, batch)
    if spec.sampler == "plugin":
        for name, (dtype, dims) in SAMPLER_INPUTS.items():
            inputs.append(TensorSpec(name, dtype, (rows, *[v if d == "V" else d for d in dims])))
    if spec.sampler != "none":
        outputs.append(TensorSpec(TOKEN_IDS, "int32", (rows,)))
    vocab = next(t for t in dec.outputs if t.name == LOGITS).shape[2]
    if spec.logits == "last":
        outputs.append(TensorSpec(LAST_LOGITS, "float32", (batch, vocab)))
    elif spec.logits == "all":  # (B, S, V): every position of the new block
        outputs.append(TensorSpec(LOGITS, "float32", (batch, dec.inputs[0].shape[1], vocab)))
    elif spec.logits == "verify":  # (B, S): every position's argmax, the logits stay on device
        outputs.append(TensorSpec(VERIFY_IDS, "int32", (batch, dec.inputs[0].shape[1])))
    outputs += [cache(t) for t in dec.outputs if t.name in presents]
    return Stage("decoder.trt.onnx", tuple(inputs), tuple(outputs))


def to_tensorrt_form(model: ir.Model, manifest: Manifest, spec: FormSpec) -> None:
    """Rewrite `model` (the bundle's decoder, in place) to the TRT form."""
    register_schemas()
    next_scale = manifest.pipeline.kind == "next-scale"
    codebook = image_sampler(manifest)  # image-token bundles (builder/image_form.py)
    if next_scale:
        _check_next_scale(spec)
    elif codebook:
        check_image_form(spec.sampler, spec.logits)  # Janus' inputs_embeds decoder included
    elif manifest.decoder.input("input_ids") is None:
        raise ArxError("this bundle's decoder takes inputs_embeds (arx export --inputs-embeds), "
                       "whose TensorRT form arx does not build yet; export without "
                       "--inputs-embeds to build it")
    if manifest.kv.update != "in_place":
        raise ArxError("the TensorRT form needs a bundle with an in-place KV cache "
                       "(kv.update = in_place); re-export it with arx export")
    if spec.s_max > manifest.kv.max_seq_len:
        raise ArxError(f"--max-seq-len {spec.s_max} exceeds the bundle's context of "
                       f"{manifest.kv.max_seq_len}; re-export with a larger --max-seq-len")
    graph = model.graph
    densify_ir(model)  # TensorRT has no MoE op: the experts in standard ops
    _check_ops(graph)
    ed = Editor(graph)
    stage = tensorrt_io(manifest, spec)
    _set_inputs(ed, stage)
    bk = _bookkeeping(ed, spec.s_max, manifest.decoder.inputs[0].name, block=next_scale)
    gqa_nodes = [n for n in graph if (n.domain, n.op_type) == GQA]
    if not gqa_nodes:
        raise ArxError("the decoder has no GroupQueryAttention node to replace; is this an arx "
                       "export? re-export it with arx export")
    rope_cache: dict = {}
    masks: dict = {}  # native form: one attention mask per window size
    for n in gqa_nodes:
        if spec.attention == "native":
            rewrite_attention_native(ed, parse_gqa(n), manifest.kv.head_dim, bk, rope_cache, masks)
        else:
            rewrite_attention(ed, parse_gqa(n), manifest.kv.head_dim, bk, rope_cache, spec.aot)
        graph.remove(n, safe=True)  # its readers read the rewrite's outputs now
    _head(ed, bk, spec, manifest.decoder.inputs[0].name, codebook)
    _set_outputs(ed, stage)
    sort_and_prune(model, keep_inputs=[t.name for t in stage.inputs])  # attention_mask goes
    _set_opsets(model, spec)


def _check_ops(graph: ir.Graph) -> None:
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph
                      if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) != GQA})
    if foreign:
        raise ArxError(f"the decoder uses ops TensorRT cannot read: {', '.join(foreign)}; "
                       f"re-export with arx export or report the op")


def _check_next_scale(spec: FormSpec) -> None:
    """A next-scale engine steps whole scales (block mask in every row) and returns every
    position's logits, which the host samples with CFG (runtime/var_generate.py)."""
    if spec.sampler != "none" or spec.logits != "all":
        raise ArxError("a next-scale (VAR) bundle's engine returns the logits of every position "
                       "of a scale for the host sampler: build it with --sampler none --logits all")


def _bookkeeping(ed: Editor, s_max: int, tokens: str = "input_ids",
                 block: bool = False) -> Bookkeeping:
    """Per-sequence lengths and positions from the two length inputs (module docstring).

        past_lengths (B,), new_lengths (B,) ─Cast int32─► past_len, new_len; total = past + new
        positions (B,S) = Min(past[:,None] + Range(0,S), S_max-1)   (padded rows stay in range)
        block (next-scale): every row's block bidirectional, Expand(True, Shape(past_lengths))
    """
    past, new = PAST_LENGTHS, NEW_LENGTHS
    total = ed.op("Add", past, new, name="seq/total")
    s = ed.op("Gather", ed.op("Shape", tokens, name="seq/ids_shape"), ed.const(1), axis=0,
              name="seq/S")
    steps = ed.op("Range", ed.const(0), s, ed.const(1), name="seq/steps")  # (S,)
    pos = ed.op("Add", ed.op("Unsqueeze", past, ed.const([1])), steps, name="seq/pos")
    pos = ed.op("Min", pos, ed.const(s_max - 1), name="seq/positions")
    past32 = ed.op("Cast", past, to=onnx.TensorProto.INT32, name="seq/past_len")
    new32 = ed.op("Cast", new, to=onnx.TensorProto.INT32, name="seq/new_len")
    rows = ed.op("Expand", ed.const(True, dtype=bool), ed.op("Shape", past), name="seq/block") \
        if block else ""
    return Bookkeeping(past_len=past32, new_len=new32, positions=pos, s_max=s_max,
                       new_len64=new, past_len64=past, total64=total, block=rows)


def _head(ed: Editor, bk: Bookkeeping, spec: FormSpec, tokens: str = "input_ids",
          codebook=None) -> None:
    """Which rows reach the LM head, each row's last valid logits, then the sampler.

        last:  logits_indices = new_len-1 (B,1) ─► logits (B,1,V) ─Squeeze─► last_logits (B,V)
        all:   logits_indices = Range(S) (B,S)  ─► logits (B,S,V) ─GatherND(new_len-1)─► last_logits
        verify: as all, and logits ─ArgMax(-1)─Cast─► verify_ids (B,S); the logits not returned
        last_logits, sampling_params, presence, seed, offset, row ─arx::sample─► token_ids (B,)
        (sampler "argmax": last_logits ─ArgMax─Cast─► token_ids, greedy, no plugin)
        codebook (an image bundle): the sampler sees the codebook's columns of [cond; null]
        rows and mixes them (guidance=1; builder/image_form.py)
    """
    last = ed.op("Unsqueeze", ed.op("Sub", bk.new_len64, ed.const(1)), ed.const([1]))  # (B, 1)
    if spec.logits in ("all", "verify"):
        shape = ed.op("Shape", tokens, end=2)  # (B, S)
        steps = ed.op("Range", ed.const(0), ed.op("Gather", shape, ed.const(1), axis=0),
                      ed.const(1))
        ed.node("Expand", [ed.op("Unsqueeze", steps, ed.const([0])), shape], [LOGITS_INDICES],
                name="head/all_rows")
        if spec.sampler != "none":
            ed.node("GatherND", [LOGITS, last], [LAST_LOGITS], batch_dims=1, name="head/last_logits")
        if spec.logits == "verify":  # ties: the first index, as the host's greedy argmax
            ed.node("Cast", [ed.op("ArgMax", LOGITS, axis=-1, keepdims=0, name="head/verify")],
                    [VERIFY_IDS], to=onnx.TensorProto.INT32, name="head/verify_ids")
    else:
        ed.node("Identity", [last], [LOGITS_INDICES], name="head/last_row")
        ed.node("Squeeze", [LOGITS, ed.const([1])], [LAST_LOGITS], name="head/last_logits")
    if spec.sampler == "plugin":
        picked = sampler_logits(ed, LAST_LOGITS, codebook) if codebook else LAST_LOGITS
        ed.node(SAMPLE, [picked, *SAMPLER_INPUTS], [TOKEN_IDS], domain=DOMAIN,
                name="head/sample", guidance=int(codebook is not None), **plugin_attrs(aot=spec.aot))
    elif spec.sampler == "argmax":  # ties: the first index, as the plugin's greedy mode
        ids = ed.op("ArgMax", LAST_LOGITS, axis=-1, keepdims=0, name="head/argmax")
        ed.node("Cast", [ids], [TOKEN_IDS], to=onnx.TensorProto.INT32, name="head/token_ids")


def _typed(ed: Editor, t: TensorSpec) -> ir.Value:
    return ed.typed(t.name, _TYPES[t.dtype], t.shape)


def _set_inputs(ed: Editor, stage: Stage) -> None:
    """The form's inputs, in the stage's order, before the rewrites read them. The bundle's
    attention_mask stays until the prune drops it with the bookkeeping that read it."""
    mask = [v for v in ed.graph.inputs if v.name == MASK]
    typed = [_typed(ed, t) for t in stage.inputs]
    ed.graph.inputs.clear()
    ed.graph.inputs.extend(typed + mask)


def _set_outputs(ed: Editor, stage: Stage) -> None:
    typed = [_typed(ed, t) for t in stage.outputs]
    ed.graph.outputs.clear()
    ed.graph.outputs.extend(typed)


def _set_opsets(model: ir.Model, spec: FormSpec) -> None:
    kept = {d: v for d, v in model.opset_imports.items()
            if d not in ("", "ai.onnx", "com.microsoft", DOMAIN)}
    model.opset_imports.clear()
    model.opset_imports[""] = spec.opset
    if any(n.domain == DOMAIN for n in model.graph):
        model.opset_imports[DOMAIN] = OPSET
    model.opset_imports.update(kept)
