"""arx.runtime."""
