"""Find the plain attention over a KV cache in a torch.export graph (ATen ops, before decomposition).

Per layer, starting from the two past placeholders of that layer:

    past_k ─┐                                      past_v ─┐
    k_new ──┴ aten.cat(dim 2) ─[head repeat]─► K   v_new ──┴ aten.cat(dim 2) ─[head repeat]─► V
    then either  scaled_dot_product_attention(q, K, V, attn_mask=M | none, scale=s)
    or           matmul(q, K^T) ─(div|mul by a number, masked_fill|where|add M, any order)─►
                 softmax(-1) ─ matmul(·, V)
    or the documented call  arx::kv_attention(q, k_new, v_new, past_k, past_v, s)

"head repeat" is what GQA modules write to widen Hkv heads to H: repeat_interleave(dim 1), or
x[:, :, None].expand(...).reshape(...) (HF's repeat_kv); both give query head h key head
h // (H / Hkv), as GroupQueryAttention does. The mask M must be computed from shapes and
constants only, and is evaluated here (mask_is_causal) at the longest context, so a sliding
window or a prefix mask is never taken for the causal one. Whatever is not recognised is
reported as a reason; the module then exports on the concatenating path.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from arx.export import cache_ops  # noqa: F401  (registers the arx:: ops _DOCUMENTED names)

aten = torch.ops.aten
_REPEAT_VIEWS = {aten.expand.default, aten.reshape.default, aten.view.default, aten.clone.default,
                 aten.alias.default, aten.slice.Tensor, aten.contiguous.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_SYM_SIZE = aten.sym_size.int
_DOCUMENTED = {torch.ops.arx.kv_attention.default, torch.ops.arx.kv_block_attention.default}


@dataclass
class Match:
    """One layer's attention: what the in-place op needs and what it replaces."""

    q: Node  # (B, H, S, D)
    k_new: Node  # (B, Hkv, S, D), this step's keys (RoPE applied by the module)
    v_new: Node
    scale: float
    out: Node  # the node whose value is the attention output (B, H, S, D)
    k_all: Node  # past + new keys/values: the module's present
    v_all: Node
    block: bool = False  # kv_attention(mask="block"): the step sees itself whole


@dataclass
class MaskProbe:
    """Sizes at which a mask built from shapes is evaluated: `sizes` maps each dynamic dim's
    symbol to a value; the step is `s` tokens after a past of `p` (the longest context)."""

    sizes: dict
    s: int
    p: int


def match_layer(past_k: Node, past_v: Node, probe: MaskProbe) -> Match | str:
    """The attention that consumes this layer's past, or why none was recognised."""
    documented = [u for u in past_k.users if u.target in _DOCUMENTED]
    if documented:
        return _documented(documented[0], past_k, past_v)
    cat_k, cat_v = _pasts_cat(past_k), _pasts_cat(past_v)
    if cat_k is None or cat_v is None:
        return f"{past_k.name} is not concatenated with new keys along dim 2 (torch.cat)"
    first, second = _repeated(cat_k), _repeated(cat_v)
    for found in (first, second):
        if isinstance(found, str):
            return found
    if first[0].target is aten.scaled_dot_product_attention.default:
        found = _sdpa(first[0], first[1], second, probe)
    else:
        found = _explicit(first[0], second, probe)
    if isinstance(found, str):
        return found
    q, scale, out = found
    return Match(q, cat_k.args[0][1], cat_v.args[0][1], scale, out, cat_k, cat_v)


def _kwargs(node: Node) -> dict:
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return pair.kwargs if pair is not None else {}


def _only_user(node: Node) -> Node | None:
    """The one consumer of `node` besides the graph's outputs and shape reads, if one."""
    users = [u for u in node.users if u.op != "output" and u.target is not _SYM_SIZE]
    return users[0] if len(users) == 1 else None


def _heads(node: Node) -> int:
    return int(node.meta["val"].shape[1])


def _pasts_cat(past: Node) -> Node | None:
    users = [u for u in past.users if u.target is aten.cat.default]
    if len(users) != 1 or len(users[0].args[0]) != 2 or users[0].args[0][0] is not past:
        return None
    return users[0] if _kwargs(users[0]).get("dim", 0) in (2, -2) else None


def _repeated(cat: Node) -> tuple[Node, Node] | str:
    """Follow the head repeat from a cat node: (its consumer, the value it consumes)."""
    x = cat
    while True:
        user = _only_user(x)
        if user is None:
            return f"{cat.name} (past + new) feeds more than one attention"
        t = user.target
        if t is aten.repeat_interleave.self_int and _kwargs(user).get("dim") in (1, -3) or \
                t is aten.unsqueeze.default and user.args[1] in (2, -3) or t in _REPEAT_VIEWS:
            x = user
        else:
            return user, x


def _documented(node: Node, past_k: Node, past_v: Node) -> Match | str:
    q, k, v, pk, pv, scale = node.args
    if pk is not past_k or pv is not past_v:
        return f"arx.export.kv_attention at {node.name} is not given the layer's past as it is"
    items = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if 0 not in items:
        return f"the output of {node.name} is unused"
    return Match(q, k, v, float(scale), items[0], items.get(1, node), items.get(2, node),
                 block=node.target is torch.ops.arx.kv_block_attention.default)


def _sdpa(node: Node, key: Node, values, probe: MaskProbe):
    kw = _kwargs(node)
    q, gqa = kw["query"], bool(kw.get("enable_gqa"))
    if values[0] is not node or kw["key"] is not key or kw["value"] is not values[1] or \
            not gqa and not _heads(key) == _heads(q) == _heads(values[1]):
        return f"{node.name} does not take the concatenated keys and values as key and value"
    if kw.get("dropout_p"):
        return f"{node.name} has dropout"
    if kw.get("is_causal"):
        return (f"{node.name} uses is_causal=True, which aligns the mask top-left (wrong after "
                f"a past); pass the causal mask as attn_mask")
    mask = kw.get("attn_mask")
    if mask is None:
        return f"{node.name} has no causal mask"
    why = mask_is_causal(mask, "bool" if mask.meta["val"].dtype == torch.bool else "additive", probe)
    scale = kw.get("scale")
    scale = 1 / math.sqrt(q.meta["val"].shape[-1]) if scale is None else float(scale)
    return why or (q, scale, node)


def _explicit(transpose: Node, values, probe: MaskProbe):
    """matmul(q, K^T) ─ scale, mask ─ softmax ─ matmul(·, V)."""
    t, a = transpose.target, transpose.args
    if not (t is aten.transpose.int and {a[1] % 4, a[2] % 4} == {2, 3}
            or t is aten.permute.default and [d % 4 for d in a[1]] == [0, 1, 3, 2]):
        return f"the concatenated keys feed {transpose.name}, not an attention"
    scores = _only_user(transpose)
    if scores is None or scores.target is not aten.matmul.default or scores.args[1] is not transpose:
        return f"{transpose.name} does not feed q @ k^T"
    node, scale, mask = scores, 1.0, None
    while (user := _only_user(node)) is not None and user.target not in _SOFTMAX:
        step = _score_step(user, node)
        if step is None or mask is not None and step[0] == "mask":
            return f"{user.name} between q @ k^T and the softmax is not a scale or a mask"
        if step[0] == "scale":
            scale *= step[1]
        else:
            mask = step[1:]
        node = user
    if user is None or user.args[1] not in (-1, 3) or mask is None:
        return f"the scores of {scores.name} reach no masked softmax over the keys"
    out, v = values
    if _only_user(user) is not out or out.target is not aten.matmul.default or \
            out.args != (user, v) or _heads(v) != _heads(scores.args[0]):
        return f"the softmax {user.name} is not applied to the concatenated values"
    return mask_is_causal(*mask, probe) or (scores.args[0], scale, out)


def _score_step(node: Node, prev: Node):
    """("scale", factor) or ("mask", mask node, kind) for one op applied to the scores."""
    t, a = node.target, node.args
    if t in (aten.div.Tensor, aten.mul.Tensor) and a[0] is prev and isinstance(a[1], (int, float)):
        return "scale", (1 / a[1] if t is aten.div.Tensor else a[1])
    if t is aten.mul.Tensor and a[1] is prev and isinstance(a[0], (int, float)):
        return "scale", a[0]
    if t is aten.masked_fill.Scalar and a[0] is prev and a[2] <= -1e4:
        return "mask", a[1], "masked"
    if t is aten.where.ScalarOther and a[1] is prev and a[2] <= -1e4:
        return "mask", a[0], "bool"
    if t is aten.add.Tensor and prev in a and isinstance(a[1 - a.index(prev)], Node):
        return "mask", a[1 - a.index(prev)], "additive"
    return None


def mask_is_causal(mask: Node, kind: str, probe: MaskProbe) -> str | None:
    """None when `mask` lets query i of a step of probe.s tokens after probe.p see exactly
    keys 0..p + i; else why not. kind: "masked" (True = hidden, masked_fill), "bool" (True =
    seen), "additive" (0 = seen, large negative = hidden)."""
    try:
        value = torch.as_tensor(_evaluate(mask, probe.sizes))
    except _DataDependent as e:
        return f"the attention mask {mask.name} depends on {e}, not on shapes only"
    allowed = {"masked": lambda m: ~m.bool(), "bool": lambda m: m.bool(),
               "additive": lambda m: m > -1e4}[kind](value)
    causal = torch.ones(probe.s, probe.p + probe.s, dtype=torch.bool).tril(diagonal=probe.p)
    try:
        same = bool((allowed == causal.expand_as(allowed)).all())
    except RuntimeError:  # not of the scores' trailing (S, P + S) shape
        same = False
    return None if same else (f"the attention mask {mask.name} is not the causal mask over past "
                              f"and new tokens (at {probe.p} past tokens)")


class _DataDependent(Exception):
    pass


def _evaluate(node, sizes: dict):
    """The value of a graph node computed from shapes and constants, at the given sizes."""
    if isinstance(node, (list, tuple)):
        return type(node)(_evaluate(v, sizes) for v in node)
    if not isinstance(node, Node):
        return node
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(node.graph.owning_module)
    if node.target is _SYM_SIZE:
        dim = node.args[0].meta["val"].shape[node.args[1]]
        return dim if isinstance(dim, int) else int(dim.node.expr.xreplace(sizes))
    if node.op != "call_function" or node.target is aten.cat.default:
        raise _DataDependent(node.name)
    return node.target(*_evaluate(list(node.args), sizes),
                       **{k: _evaluate(v, sizes) for k, v in node.kwargs.items()})
