"""Media helpers: H.264 encoding."""
