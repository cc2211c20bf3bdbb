"""arx.plugins."""
