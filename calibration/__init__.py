"""arx.calibration."""
