"""arx: export autoregressive PyTorch models to deployable bundles and run them.

The core package (cli, manifest, errors) imports nothing heavy; the stages live in
arx.export (torch -> ONNX), arx.calibration, arx.plugins and arx.runtime (numpy + onnxruntime).
"""

__version__ = "0.1.0"
