"""arx.calibration: fp32 bundle -> quantized bundle (w8a8 Q/DQ, w8/w4 MatMulNBits), with an accuracy gate.

Entry point: `arx.calibration.calibrator.calibrate_bundle(bundle=, output=, options=CalibrateOptions(...))`
(options in `arx.calibration.options`). Modules import onnx/onnxruntime; this package file does not.
See docs/calibration.md.
"""
