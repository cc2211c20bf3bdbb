"""A decoder-protocol module exported to the in-place form the built-in families use.

    module(input_ids, position_ids, past) ─ wrapped with the bundle's IO ─ torch.export
        │      input_ids, attention_mask, position_ids, logits_indices, past_key_values.i.*
        ▼
    per layer: cat(past, new) + attention (export/attention_match.py)
        ──► arx::cache_attention(q, k_new, v_new, past_k, past_v, attention_mask, scale)
    the module's own mask, cat and shape reads die; logits rows picked before the LM head
        ▼
    torch.export again (shapes re-derived) ─ torch.onnx, cache_attention translated to
        Transpose/Reshape ─ com.microsoft GroupQueryAttention (do_rotary 0: the module applied
        RoPE itself) ─ Transpose, seqlens_k = sum(attention_mask) - 1, total = mask.shape[1]

The in-place buffers are (B, Hkv, S_max, D): anything in the module that still reads the past's
length or the concatenation after the rewrite (positions taken from the cache length, a
present used twice) would change meaning, so then the fast path is refused with that reason
and the module exports on the concatenating path (export/protocol.py).
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch.fx import GraphModule, Node

from arx.export.attention_match import Match, MaskProbe, match_layer
from arx.export import cache_ops  # noqa: F401  (registers the arx:: ops)
from arx.export.gqa_onnx import translation_table
from arx.export.torch_output import quiet_torch

FAST_INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_indices")
_DIMS = {"input_ids": ("batch_size", "sequence_length"),
         "attention_mask": ("batch_size", "total_sequence_length"),
         "position_ids": ("batch_size", "sequence_length"),
         "logits_indices": ("batch_size", "logits_length")}
aten = torch.ops.aten
CACHE_OP = torch.ops.arx.cache_attention.default


class NotRecognised(Exception):
    """The module's attention over its cache is not one the fast path can take (the reason)."""


def _bundle_io(module, layers: int):
    """`module` behind the bundle's IO: the past as flat tensors, logits at logits_indices."""

    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, input_ids, attention_mask, position_ids, logits_indices, *flat_past):
            past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(layers)]
            logits, present = self.inner(input_ids, position_ids, past)
            rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
            return (logits[rows, logits_indices], *[t for pair in present for t in pair])

    wrapped = InPlace()
    wrapped.training = False  # the module keeps its own mode (a program's module has no train())
    return wrapped


def _example(kv, embeds: int | None = None):
    """Example inputs (no two dynamic dims of one size) and their dynamic dims; `embeds`: the
    token input is inputs_embeds (B, S, embeds) float32 instead of ids."""
    b, s, past, k = 2, 3, 5, 4
    dims = {n: torch.export.Dim(n) for n in {d for ds in _DIMS.values() for d in ds}}
    dims["past_sequence_length"] = torch.export.Dim("past_sequence_length")
    tokens = torch.zeros(b, s, embeds) if embeds else torch.zeros(b, s, dtype=torch.long)
    example = (tokens, torch.ones(b, past + s, dtype=torch.long),
               torch.arange(past, past + s).repeat(b, 1), torch.zeros(b, k, dtype=torch.long),
               *[torch.zeros(b, kv.kv_heads, past, kv.head_dim) for _ in range(2 * kv.layers)])
    dyn = tuple({i: dims[d] for i, d in enumerate(_DIMS[n])} for n in FAST_INPUTS)
    flat = tuple({0: dims["batch_size"], 2: dims["past_sequence_length"]} for _ in range(2 * kv.layers))
    return example, dyn + (flat,)


def _probe(gm: GraphModule, kv) -> MaskProbe:
    """Mask probe sizes: a 3-token step after the rest of the context, batch 2."""
    s = min(3, kv.max_seq_len - 1)
    p = kv.max_seq_len - s
    value = {"batch_size": 2, "sequence_length": s, "total_sequence_length": p + s,
             "logits_length": 1, "past_sequence_length": p}
    sizes = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        names = _DIMS.get(node.target) or ("batch_size", None, "past_sequence_length")
        for dim, name in zip(node.meta["val"].shape, names):
            if name and not isinstance(dim, int):
                sizes[dim.node.expr] = value[name]
    return MaskProbe(sizes, s, p)


def rewrite_to_cache_attention(gm: GraphModule, kv, block: bool = False) -> list[Match]:
    """Replace each layer's attention with arx::cache_attention in place; raise NotRecognised.
    block: the model attends to whole blocks (kv_attention(mask="block")) and is always stepped
    with the block mask, so its decoder.onnx (causal) serves width-1 steps only, where the two
    masks agree; a block layer in any other model, or a causal one in it, is refused."""
    graph = gm.graph
    ph = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    pasts = [n for n in graph.nodes if n.op == "placeholder" and n.target not in FAST_INPUTS]
    probe = _probe(gm, kv)
    matches = []
    for i in range(kv.layers):
        found = match_layer(pasts[2 * i], pasts[2 * i + 1], probe)
        if isinstance(found, str):
            raise NotRecognised(f"layer {i}: {found}")
        if found.block != block:
            raise NotRecognised(_mask_mismatch(i, found.block))
        matches.append(found)
    output = next(n for n in graph.nodes if n.op == "output")
    for i, m in enumerate(matches):
        with graph.inserting_before(m.out):
            node = graph.call_function(CACHE_OP, (m.q, m.k_new, m.v_new, pasts[2 * i],
                                                         pasts[2 * i + 1], ph["attention_mask"],
                                                         m.scale))
            out, pk, pv = (graph.call_function(operator.getitem, (node, j)) for j in range(3))
        m.out.replace_all_uses_with(out)
        for old, new in ((m.k_all, pk), (m.v_all, pv)):  # the presents: graph outputs only
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user is output)
    _logits_rows_first(graph)
    # SDPA counts as impure (its dropout is seeded): the replaced ones go all the same
    replaced = {m.out for m in matches}
    graph.eliminate_dead_code(is_impure_node=lambda n: n not in replaced and n.is_impure())
    _check_nothing_left(graph, pasts, matches)
    gm.recompile()
    return matches


def _mask_mismatch(layer: int, block: bool) -> str:
    if block:
        return (f"layer {layer}: kv_attention(mask='block') attends to the whole step, which "
                f"only a next-scale model (arx_var) is stepped with")
    return (f"layer {layer}: a next-scale model needs kv_attention(..., mask='block') in every "
            f"layer")


def _check_nothing_left(graph, pasts: list[Node], matches: list[Match]) -> None:
    """After the rewrite nothing may read the concatenation or the past's length."""
    alive = set(graph.nodes)
    for i, m in enumerate(matches):
        for old in (m.k_all, m.v_all):
            if old in alive and old.op != "placeholder":
                users = ", ".join(u.name for u in old.users)
                raise NotRecognised(f"layer {i}: past + new ({old.name}) is read by {users} "
                                    f"besides the attention and the present")
    for j, past in enumerate(pasts):
        for user in past.users:
            length = user.target is aten.sym_size.int and user.args[1] in (2, -2)
            if length or user.target not in (CACHE_OP, aten.sym_size.int) and \
                    user.op != "call_module":
                what = "length (shape[2])" if length else f"values ({user.name})"
                raise NotRecognised(f"layer {j // 2}: the module reads the past's {what} outside "
                                    f"the attention, which the in-place cache changes (a buffer "
                                    f"of the context's length); take positions from position_ids")


def _logits_rows_first(graph) -> None:
    """index(linear(x), rows) -> linear(index(x, rows)): only the rows that need logits reach
    the LM head (most of a prefill's work at large vocabularies)."""
    output = next(n for n in graph.nodes if n.op == "output")
    pick = output.args[0][0]
    head = pick.args[0] if pick.target is aten.index.Tensor else None
    if head is None or head.target is not aten.linear.default or len(head.users) != 1:
        return
    with graph.inserting_before(pick):
        rows = graph.call_function(aten.index.Tensor, (head.args[0], pick.args[1]))
        logits = graph.call_function(aten.linear.default, (rows, *head.args[1:]))
    pick.replace_all_uses_with(logits)


def trace_in_place(module, kv, input_names: list[str], output_names: list[str], *,
                   embeds: int | None = None, block: bool = False):
    """torch.onnx program of `module` in the in-place form; NotRecognised when it cannot be.
    embeds: its token input is inputs_embeds of that width; block: see rewrite_to_cache_attention."""
    example, dyn = _example(kv, embeds)
    wrapped = _bundle_io(module, kv.layers)
    with warnings.catch_warnings(), quiet_torch():
        warnings.simplefilter("ignore")  # the tracer's notes are not the user's problem
        gm = torch.export.export(wrapped, example, dynamic_shapes=dyn, strict=False).module()
        matches = rewrite_to_cache_attention(gm, kv, block)
        # the unlifted module takes the past as flat arguments
        program = torch.export.export(gm, example, dynamic_shapes=(*dyn[:-1], *dyn[-1]),
                                      strict=False)
        onnx_program = torch.onnx.export(
            program, (), dynamo=True, input_names=input_names, output_names=output_names,
            opset_version=21, custom_translation_table=translation_table(), verbose=False)
    model = onnx_program.model_proto
    _batch_from_input_ids(model, input_names[0])
    # torch.onnx's intermediate type annotations go stale once `arx build` changes precision;
    # the built-in families' graphs carry none either
    del model.graph.value_info[:]
    return model, matches


def _batch_from_input_ids(model, tokens: str = "input_ids") -> None:
    """torch.onnx may read the batch size off attention_mask; read it off input_ids (the same
    by the IO contract), so that attention_mask feeds only the attention's bookkeeping, which
    the general-step graph replaces by per-row lengths (and drops attention_mask)."""
    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Shape" and node.input[0] == "attention_mask" and \
                attrs.get("start", 0) == 0 and attrs.get("end") == 1:
            node.input[0] = tokens


def layer_kinds(matches: list[Match]) -> list[str]:
    """How each layer's attention was written, for the manifest's model section."""
    kinds = {aten.scaled_dot_product_attention.default: "cat + scaled_dot_product_attention",
             aten.matmul.default: "cat + softmax", operator.getitem: "arx.export.kv_attention"}
    return [kinds.get(m.out.target, str(m.out.target)) for m in matches]
