"""MuseTalk neural lip-sync. The only package that imports torch, diffusers and transformers.

``MuseTalkEngine`` is imported on first use, so that the inference process's host
(:mod:`.process`) and its spawned children import without torch until their core needs it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MuseTalkEngine"]


def __getattr__(name: str) -> Any:
    if name == "MuseTalkEngine":
        from .engine import MuseTalkEngine  # noqa: PLC0415

        return MuseTalkEngine
    raise AttributeError(name)
