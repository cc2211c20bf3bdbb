"""The plugin-free attention form (ONNX Attention + TensorScatter, opset 24) lives in
export/attention_rewrite.py: the bundle's general-step graph is written with the same emitter at
export (export/ must not import builder/). Re-exported here for the TensorRT form."""

from arx.export.attention_rewrite import (NATIVE_OPSET, attention_mask,  # noqa: F401
                                          rewrite_attention_native)
