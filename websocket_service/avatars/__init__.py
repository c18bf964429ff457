"""Avatars: prepared frames of base videos and action clips, cached on disk and in memory."""

from .model import Avatar, BaseFrame, Clip, ClipKind

__all__ = ["Avatar", "BaseFrame", "Clip", "ClipKind"]
