"""ONNX translation of arx::cache_attention: com.microsoft GroupQueryAttention, for torch.onnx.

    q (B,H,S,D) ─Transpose─Reshape─► (B,S,H*D)        k, v (B,Hkv,S,D) ─► (B,S,Hkv*D)
    attention_mask (B,T) ─ReduceSum(1) - 1─Cast int32─► seqlens_k;  Shape[1]─► total (scalar)
    GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total; num_heads, kv_num_heads,
        scale, do_rotary=0) ─► out (B,S,H*D) ─Reshape─Transpose─► (B,H,S,D), present_k, present_v

The same node, attributes and bookkeeping as export/decoder_graph.py emits for the built-in
families, so the runtime, the general-step graph and `arx build` treat both alike. onnx has no
schema for the contrib op; torch.onnx's graph builder needs one, so a minimal one is declared
here (only the inputs and attributes used).
"""

from __future__ import annotations

import functools

import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset21 as op

_INT32 = 6


@functools.lru_cache(maxsize=None)
def _gqa() -> onnxscript.values.Op:
    param, attr = OpSchema.FormalParameter, OpSchema.Attribute
    inputs = [param(n, "T") for n in ("query", "key", "value", "past_key", "past_value")]
    inputs += [param(n, "M") for n in ("seqlens_k", "total_sequence_length")]
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs,
        outputs=[param(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, ""),
                    attr("kv_num_heads", OpSchema.AttrType.INT, ""),
                    attr("scale", OpSchema.AttrType.FLOAT, ""),
                    attr("do_rotary", OpSchema.AttrType.INT, "")])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), schema.name, schema)


def _cache_attention(q, k, v, past_k, past_v, attention_mask, scale: float):
    heads, kv_heads, d = q.shape[1], past_k.shape[1], q.shape[3]
    bshd = [0, 2, 1, 3]  # (B,H,S,D) <-> (B,S,H,D)
    flat = op.Constant(value_ints=[0, 0, -1])
    q3, k3, v3 = (op.Reshape(op.Transpose(t, perm=bshd), flat) for t in (q, k, v))
    lens = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)
    seqlens_k = op.Cast(op.Sub(lens, op.Constant(value_int=1)), to=_INT32)
    total = op.Cast(op.Gather(op.Shape(attention_mask), op.Constant(value_int=1), axis=0), to=_INT32)
    out, present_k, present_v = _gqa()(q3, k3, v3, past_k, past_v, seqlens_k, total,
                                       num_heads=int(heads), kv_num_heads=int(kv_heads),
                                       scale=float(scale), do_rotary=0)
    out4 = op.Reshape(out, op.Constant(value_ints=[0, 0, int(heads), int(d)]))
    return op.Transpose(out4, perm=bshd), present_k, present_v


def translation_table() -> dict:
    import torch

    from arx.export import cache_ops  # noqa: F401  (registers arx::cache_attention)

    return {torch.ops.arx.cache_attention.default: _cache_attention}
