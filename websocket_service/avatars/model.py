"""The in-memory form of a prepared avatar."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
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
