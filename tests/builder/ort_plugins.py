"""Run the TensorRT form on ONNX Runtime: the arx plugin ops as Python custom ops (PyOp).

Each op calls its NumPy reference from arx.plugins, the specification the TensorRT plugins
implement, so running the rewritten graph here checks the graph pass end to end on the CPU.
PyOps live in onnxruntime-extensions' domain (ai.onnx.contrib) with fixed input types and no
float16, so a copy of the model gets its arx nodes moved there, fp16 values cast around them;
kv_attention has one op per cache dtype (an fp16 cache, widened on the way in, is narrowed back
before the reference writes it, so it rounds what it stores as the plugin does).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime_extensions as ort_ext

CONTRIB = "ai.onnx.contrib"
_DT = ort_ext.PyCustomOpDef
_COMMON = {"plugin_namespace": _DT.dt_string, "plugin_version": _DT.dt_string, "aot": _DT.dt_int64}
_registered: set[str] = set()


# cache elem type -> (op suffix, PyOp type of the cache IO, numpy dtype the reference holds)
_CACHES = {onnx.TensorProto.FLOAT: ("f32", _DT.dt_float, np.float32),
           onnx.TensorProto.FLOAT16: ("f32_c16", _DT.dt_float, np.float16),
           onnx.TensorProto.INT8: ("f32_c8", _DT.dt_int8, np.int8)}


def _register_attention(cache: int) -> str:
    from arx.plugins import AttentionOptions, kv_attention_reference

    suffix, ct, held = _CACHES[cache]
    if f"kv_attention_{suffix}" in _registered:
        return suffix
    _registered.add(f"kv_attention_{suffix}")
    ft = _DT.dt_float

    @ort_ext.onnx_op(op_type=f"kv_attention_{suffix}",
                     inputs=[ft] * 3 + [ct] * 2 + [_DT.dt_int32] * 2 + [ft] * 2,
                     outputs=[ft] + [ct] * 2,
                     attrs={"mask": _DT.dt_string, "scale": _DT.dt_float,
                            "window": _DT.dt_int64, **_COMMON})
    def kv_attention(q, k_new, v_new, k_cache, v_cache, past_len, new_len, k_scale, v_scale,
                     **attrs):
        # ORT gives no aliasing: return copies, in the dtype the plugin's cache holds
        k_cache, v_cache = k_cache.astype(held), v_cache.astype(held)
        scales = dict(k_scale=k_scale, v_scale=v_scale) if held == np.int8 else {}
        out = kv_attention_reference(q, k_new, v_new, k_cache, v_cache, past_len, new_len,
                                     AttentionOptions(mask=attrs["mask"], scale=attrs["scale"],
                                                      window=int(attrs["window"])), **scales)
        wide = np.float32 if held == np.float16 else held  # the PyOp's cache IO type
        return out, k_cache.astype(wide), v_cache.astype(wide)

    return suffix


def _register(suffix: str, ft) -> None:
    from arx.plugins import sample_reference

    if suffix in _registered:
        return
    _registered.add(suffix)

    @ort_ext.onnx_op(op_type=f"sample_{suffix}",
                     inputs=[ft, _DT.dt_float, _DT.dt_bool, _DT.dt_int64, _DT.dt_int64,
                             _DT.dt_int64],
                     outputs=[_DT.dt_int32], attrs={"guidance": _DT.dt_int64, **_COMMON})
    def sample(logits, params, presence, seed, offset, row, **attrs):
        return sample_reference(logits, params, presence, seed, offset, row).astype(np.int32)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    from arx.builder.schemas import register_schemas

    register_schemas()
    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name: vi.type.tensor_type.elem_type
            for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}


def _widen_float16(model: onnx.ModelProto, node: onnx.NodeProto, types: dict) -> None:
    """The Python op API has no float16: Cast float16 inputs up and float16 outputs back down
    around the node (the kernels accumulate in fp32 too, and write fp16 results)."""
    from onnx import TensorProto, helper

    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    casts = []
    for j, name in enumerate(node.input):
        if types.get(name) == f16:
            node.input[j] = f"{name}/arx_test_f32_{node.name}"
            casts.append(helper.make_node("Cast", [name], [node.input[j]], to=f32))
    for j, name in enumerate(node.output):
        if types.get(name) == f16:
            node.output[j] = f"{name}/arx_test_f32"
            casts.append(helper.make_node("Cast", [node.output[j]], [name], to=f16))
    model.graph.node.extend(casts)


def ort_session(model: onnx.ModelProto):
    """An InferenceSession running `model` (a TensorRT-form graph) with the PyOp plugins."""
    import onnxruntime as ort

    from onnx_ir.passes.common import TopologicalSortPass

    from arx.export.graph_ir import from_proto, to_proto

    model = onnx.ModelProto.FromString(model.SerializeToString())
    types = _elem_types(model)
    for node in list(model.graph.node):
        if node.domain == "arx":
            suffix = "f32"
            if node.op_type == "kv_attention":
                suffix = _register_attention(types[node.input[3]])
            _widen_float16(model, node, types)
            _register("f32", _DT.dt_float)
            node.op_type, node.domain = f"{node.op_type}_{suffix}", CONTRIB
    ir_model = from_proto(model)  # the casts around the PyOps were appended last
    TopologicalSortPass()(ir_model)
    model = to_proto(ir_model)
    model.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_ext.get_library_path())
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
