"""arx.export."""
