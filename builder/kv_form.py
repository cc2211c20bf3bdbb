"""The KV cache dtype of a TensorRT form: the precision's, or the one `--kv-dtype` chose.

    bundle decoder (GQA with the fp16 casts / int8 scales of export/kv_dtype.py)
        ─restore_decoder─► the fp32-cache GQA the form rewrites, + the int8 scales
        ─to_tensorrt_form─► TensorScatter + Attention (native) or arx::kv_attention (plugin)
        ─retype_step_ir (native)─► each cache write encoded (Cast, or Div/Round/Clip/Cast),
                                      Attention reading the decoded cache (Cast, Cast x scale)

The cache dtype: `arx build --kv-dtype`, else the bundle's `--kv-dtype` cache, else the
precision's (fp16 for fp16 and int8 engines, bf16 for bf16, fp32 for fp32: builder/precision.py).
Both forms take any of them: the native form through the step graph's encode/decode ops, the
arx::kv_attention plugin natively (its cache inputs in that dtype, an int8 cache's scales as
fp32 inputs: builder/attention.attach_cache_scales, plugins/trt_contract.CACHE_COMBOS).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from arx.errors import ArxError
from arx.export.kv_dtype import EXTENSION, manifest_dtype, retype_step_ir
from arx.manifest import Manifest

from .precision import CACHE_DTYPES


def bundle_cache(manifest: Manifest) -> str:
    """The dtype `arx export/calibrate --kv-dtype` gave the bundle's cache (float32 if none)."""
    return manifest.extensions.get(EXTENSION, {}).get("dtype", "float32")


def form_cache_dtype(manifest: Manifest, precision: str, kv_dtype: str | None) -> str:
    natural = CACHE_DTYPES[precision]
    bundle = bundle_cache(manifest)
    want = manifest_dtype(kv_dtype) if kv_dtype else (bundle if bundle != "float32" else natural)
    if want == "float32" and natural != "float32":
        raise ArxError(f"--kv-dtype fp32 with --precision {precision}: the {precision} form keeps "
                       f"a {natural} cache; drop --kv-dtype, or build --precision fp32")
    if want == "int8" and bundle != "int8":
        raise ArxError("an int8 cache needs the scales arx calibrate measures: run arx calibrate "
                       "BUNDLE --kv-dtype int8 --data FILE and build its output")
    return want


def retype_form_cache(model: ir.Model, manifest: Manifest, cache_dtype: str,
                      precision: str, scales: dict[str, np.ndarray] | None) -> None:
    """Give the form's cache `cache_dtype` (before apply_precision): the native form's writes
    and reads (apply_precision then lowers the decoded values and the scales with the rest of
    the graph); for the plugin form, whose nodes read the cache inputs themselves, only the
    cache IO is retyped (its scales come after the precision pass)."""
    if cache_dtype != CACHE_DTYPES[precision]:
        retype_step_ir(model, manifest.kv, cache_dtype, scales)
