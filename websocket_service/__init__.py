"""Real-time talking-avatar streaming service."""

__version__ = "0.1.0"
