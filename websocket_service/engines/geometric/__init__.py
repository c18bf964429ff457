"""The weight-free default engine."""

from .engine import GeometricEngine

__all__ = ["GeometricEngine"]
