"""ONNX schemas of the arx plugin ops, so `onnx.checker` and strict shape inference know them.

The node contracts are the plugins' (plugins/trt_contract.py, the module TensorRT registers
in arx and in the kits): same input order, same attribute names. TensorRT's ONNX
parser maps a node it does not know to the plugin whose name is the node's op_type, in the
namespace of its `plugin_namespace` attribute (`arx::kv_attention` -> op_type `kv_attention`,
plugin_namespace "arx"); the `aot` attribute asks for the ahead-of-time implementation.
The ONNX domain is "arx" too, so the nodes never collide with another library's ops.
"""

from __future__ import annotations

import onnx
from onnx import defs, helper

DOMAIN = "arx"
OPSET = 1
KV_ATTENTION = "kv_attention"
SAMPLE = "sample"
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
CACHES = [*FLOATS, "tensor(int8)"]  # which pairs with T: trt_contract.CACHE_COMBOS

# TensorRT's reading of a plugin node: common attributes of every arx plugin node.
_PLUGIN_ATTRS = (("plugin_namespace", "arx"), ("plugin_version", "1"), ("aot", 1))


def _attr(name: str, default, doc: str) -> defs.OpSchema.Attribute:
    return defs.OpSchema.Attribute(name, helper.make_attribute(name, default), doc)


def _param(name: str, type_str: str, doc: str = "") -> defs.OpSchema.FormalParameter:
    return defs.OpSchema.FormalParameter(name, type_str, doc)


def _common_attrs() -> list:
    return [_attr(k, v, "read by TensorRT's ONNX parser") for k, v in _PLUGIN_ATTRS]


def _kv_attention_schema() -> defs.OpSchema:
    # q (B,S_new,Hq,D)  k_new/v_new (B,S_new,Hkv,D)  k_cache/v_cache (B,Hkv,S_max,D)
    # past_len/new_len (B,) int32  k_scale/v_scale (Hkv,1,D) f32 (int8 cache; else (1,), unread)
    #   ->  out (B,S_new,Hq,D), k_cache, v_cache (aliased, in place)
    inputs = [_param("q", "T"), _param("k_new", "T"), _param("v_new", "T"),
              _param("k_cache", "C"), _param("v_cache", "C"),
              _param("past_len", "tensor(int32)"), _param("new_len", "tensor(int32)"),
              _param("k_scale", "tensor(float)"), _param("v_scale", "tensor(float)")]
    outputs = [_param("out", "T"), _param("k_cache_out", "C"), _param("v_cache_out", "C")]
    attrs = [_attr("mask", "causal", "causal | block"),
             _attr("scale", 0.0, "0.0 = 1/sqrt(D)"),
             _attr("window", 0, "sliding window: query at p sees keys j > p - window; 0 = none"),
             *_common_attrs()]
    schema = defs.OpSchema(KV_ATTENTION, DOMAIN, OPSET, "arx fused attention over a KV cache",
                           inputs=inputs, outputs=outputs, attributes=attrs,
                           type_constraints=[("T", FLOATS, "activations"),
                                             ("C", CACHES, "the cache: T, float16 or int8")])

    def infer(ctx) -> None:
        for out_index, in_index in ((0, 0), (1, 3), (2, 4)):
            t = onnx.TypeProto()
            t.CopyFrom(ctx.get_input_type(in_index))
            ctx.set_output_type(out_index, t)

    schema.set_type_and_shape_inference_function(infer)
    return schema


def _sample_schema() -> defs.OpSchema:
    # logits (R,V) with R = B or 2B (guidance)  params (B,5) f32  presence (B,V) bool
    # seed/offset/row (B,) int64  ->  ids (B,) int32
    inputs = [_param("logits", "T"), _param("params", "tensor(float)"),
              _param("presence", "tensor(bool)"), _param("seed", "tensor(int64)"),
              _param("offset", "tensor(int64)"), _param("row", "tensor(int64)")]
    attrs = [_attr("guidance", 0, "1: logits rows are [cond; uncond]"), *_common_attrs()]
    schema = defs.OpSchema(SAMPLE, DOMAIN, OPSET, "arx token sampler",
                           inputs=inputs, outputs=[_param("ids", "tensor(int32)")],
                           attributes=attrs, type_constraints=[("T", FLOATS, "logits")])

    def infer(ctx) -> None:
        params = ctx.get_input_type(1).tensor_type
        out = helper.make_tensor_type_proto(onnx.TensorProto.INT32, None)
        dim = out.tensor_type.shape.dim.add()
        if params.HasField("shape") and len(params.shape.dim) == 2:
            dim.CopyFrom(params.shape.dim[0])
        ctx.set_output_type(0, out)

    schema.set_type_and_shape_inference_function(infer)
    return schema


def register_schemas() -> None:
    """Register both schemas with onnx.defs (idempotent, a call rather than an import effect)."""
    for make in (_kv_attention_schema, _sample_schema):
        schema = make()
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


def plugin_attrs(aot: bool) -> dict:
    """The TensorRT attributes every arx plugin node carries."""
    return {"plugin_namespace": "arx", "plugin_version": "1", "aot": int(aot)}


def has_plugin_nodes(graph: onnx.GraphProto) -> bool:
    """Whether any arx plugin node is in `graph` (then it needs the arx opset, PTX, registration)."""
    return any(n.domain == DOMAIN for n in graph.node)
