"""MuseTalk neural lip-sync. The only package that imports torch, diffusers and transformers."""

from .engine import MuseTalkEngine

__all__ = ["MuseTalkEngine"]
