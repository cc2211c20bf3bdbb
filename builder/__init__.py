"""arx.builder: bundle -> TensorRT form, engines and device build kits."""
