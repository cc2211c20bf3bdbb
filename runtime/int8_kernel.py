"""Whether this host's onnxruntime int8 MatMul saturates, and what a w8a8 bundle does about it.

On x86-64 CPUs without VNNI (AVX2 only, or AVX-512 without VNNI), onnxruntime's MLAS runs an
int8 MatMul as u8 x s8 with VPMADDUBSW, which adds two u8 * s8 products into a saturating
int16 (onnxruntime's quantization docs, "When and why do I need to try U8U8?"). arx's w8a8 is
symmetric s8 x s8 (the form TensorRT reads); MLAS shifts the s8 activations to u8 first, so a
pair of large activations on two large 8-bit weights reaches 2 * 255 * 127 = 64770 and is
clipped to 32767. Weights in 7 bits (onnxruntime's reduce_range: [-64, 64]) keep every pair
under 2 * 255 * 64 = 32640. VNNI and AMX (VPDPBUSD) and ARM's SDOT accumulate in int32 and do
not saturate; neither do MatMulNBits' int8 kernels (w8, w4), which take |activation| in 7 bits.

The probe runs that case through onnxruntime itself instead of reading CPU flags: the flags
differ by OS, and what matters is the kernel this onnxruntime build picks on this CPU.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

EXTENSION = "quantization"  # = calibration.calibrator.EXTENSION (the runtime imports no calibration)
K, N = 64, 8


def _probe_model():
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((K, N), 127, np.int8)
    w[:, 1::2] = -127
    scale = np.array(1 / 127, np.float32)
    zero = np.array(0, np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(zero, "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "int8_saturation_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, N])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@functools.cache
def int8_matmul_saturates() -> bool:
    """True when onnxruntime's CPU int8 MatMul (the fused Q/DQ form of a w8a8 graph) clips the
    product of full-range activations and 8-bit weights on this host (a few ms, once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(_probe_model().SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.ones((4, K), np.float32)})[0]
    exact = float(K)  # every weight and activation dequantizes to +-1
    return bool(np.abs(np.abs(y) - exact).max() > 0.01 * exact)


def reduce_range_needed(choice: str) -> bool:
    """--reduce-range auto|on|off for a w8a8 calibration: auto is on where this host saturates."""
    return choice == "on" or (choice == "auto" and int8_matmul_saturates())


def saturation_warning(manifest, device: str = "cpu") -> str | None:
    """The one-line warning for a w8a8 bundle with full 8-bit weights run on a CPU that
    saturates, else None (checked only for such bundles: the probe is not free)."""
    ext = manifest.extensions.get(EXTENSION) or {}
    if device != "cpu" or ext.get("scheme") != "w8a8" or ext.get("reduce_range", False):
        return None
    if not int8_matmul_saturates():
        return None
    return ("this w8a8 bundle's 8-bit weights run here on onnxruntime's u8 x s8 kernel, which "
            "saturates on this CPU (x86 without VNNI) and loses accuracy; recalibrate with "
            "arx calibrate --reduce-range on (auto picks it on such a CPU)")


@functools.cache
def _warn_once(line: str) -> None:
    print(f"arx: warning: {line}", file=sys.stderr)


def warn_if_saturating(manifest, device: str = "cpu") -> None:
    line = saturation_warning(manifest, device)
    if line:
        _warn_once(line)
