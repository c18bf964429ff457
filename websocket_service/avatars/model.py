"""The in-memory form of a prepared avatar."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np


class ClipKind(str, Enum):
    BASE = "base"
    ACTION = "action"


@dataclass
class Clip:
    """A sequence of RGB frames (N, H, W, 3) uint8 at the avatar's size."""

    name: str
    kind: ClipKind
    frames: np.ndarray

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"clip {self.name!r}: frames must be (N,H,W,3) uint8")
        if len(self.frames) == 0:
            raise ValueError(f"clip {self.name!r} has no frames")

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class Avatar:
    """A prepared avatar. ``engine_data`` holds each engine's cached analysis by engine name."""

    avatar_id: str
    width: int
    height: int
    clips: dict[str, Clip]
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    engine_data: dict[str, Any] = field(default_factory=dict)

    @property
    def base_videos(self) -> list[str]:
        return [n for n, c in self.clips.items() if c.kind is ClipKind.BASE]

    @property
    def actions(self) -> list[str]:
        return [n for n, c in self.clips.items() if c.kind is ClipKind.ACTION]

    def clip(self, name: str) -> Clip:
        return self.clips[name]

    @cached_property
    def names(self) -> VideoNames:
        """The clips under the protocol's names (``idle_0``, ``speaking_0``, ``action_1``...)."""
        return VideoNames(self)


#: base clips whose name starts with one of these are for speech (``speaking_k``)
SPEAKING_PREFIXES = ("speaking", "talk")


def clip_role(clip: Clip) -> str:
    """``idle``, ``speaking`` or ``action``: the group a clip is named in."""
    if clip.kind is ClipKind.ACTION:
        return "action"
    return "speaking" if clip.name.startswith(SPEAKING_PREFIXES) else "idle"


class VideoNames:
    """Upstream names for every clip, in clip order: ``idle_k`` and ``speaking_k`` count from
    0, ``action_k`` from 1 (``action_index`` k). Lookups accept either kind of name."""

    def __init__(self, avatar: Avatar) -> None:
        counters = {"idle": 0, "speaking": 0, "action": 1}
        self.name_of: dict[str, str] = {}
        self.roles: dict[str, str] = {}
        for clip in avatar.clips.values():
            role = clip_role(clip)
            self.name_of[clip.name] = f"{role}_{counters[role]}"
            self.roles[clip.name] = role
            counters[role] += 1
        self.clip_of = {v: k for k, v in self.name_of.items()}
        self.frames = {c.name: len(c) for c in avatar.clips.values()}

    def clip(self, name: str) -> str | None:
        """The clip called ``name`` (upstream or own name); None if there is none."""
        if name in self.clip_of:
            return self.clip_of[name]
        return name if name in self.name_of else None

    def action_clip(self, index: int) -> str | None:
        return self.clip_of.get(f"action_{index}")

    def public(self, clip: str) -> str:
        return self.name_of.get(clip, clip)

    def available(self) -> list[str]:
        return list(self.clip_of)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n, "clip": c, "kind": self.roles[c], "frames": self.frames[c]}
                for n, c in self.clip_of.items()]


@dataclass(frozen=True)
class BaseFrame:
    """The frame a speech frame is drawn on.

    ``clip``/``index`` name the avatar frame whose cached analysis (mouth geometry, latents)
    applies; ``image`` is the picture to draw on, which during an action crossfade is a blend
    of that frame and the base video (the geometry of ``clip``/``index`` still applies).
    """

    clip: str
    index: int
    image: np.ndarray
    action: str | None = None  # the action clip playing at this frame, if any
    progress: float = 0.0  # the action's progress 0..1
