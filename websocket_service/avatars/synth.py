"""Subtle motion synthesised from one still frame: idle loops and action clips.

Every clip eases in and out (zero velocity at both ends), so the ping-pong idle loop has no
seam and action clips start and end on (nearly) the still pose, which the session's crossfade
then hides completely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Motion:
    frames: int
    dx: float = 0.0  # px at the peak (in output pixels)
    dy: float = 0.0
    angle: float = 0.0  # degrees at the peak
    scale: float = 0.0  # relative zoom at the peak
    profile: str = "ease"  # "ease": 0 -> 1 (for loops); "bump": 0 -> 1 -> 0 (for actions)


BUILTIN_BASES = {
    "idle": Motion(frames=50, dy=2.0, scale=0.008, angle=0.6),
    "listening": Motion(frames=50, dx=-3.0, dy=3.0, angle=2.5, scale=0.012),
    # the base for speech: livelier, small nods as people make while talking
    "speaking": Motion(frames=40, dx=2.0, dy=5.0, angle=-1.5, scale=0.01),
}
BUILTIN_ACTIONS = {
    "nod": Motion(frames=25, dy=14.0, scale=0.01, profile="bump"),
    "tilt": Motion(frames=30, angle=6.0, dx=6.0, profile="bump"),
    "shake": Motion(frames=30, dx=10.0, profile="shake"),
}


def _weights(m: Motion) -> np.ndarray:
    t = np.linspace(0.0, 1.0, m.frames)
    if m.profile == "ease":
        return 0.5 - 0.5 * np.cos(math.pi * t)
    if m.profile == "bump":
        return np.sin(math.pi * t) ** 2
    # "shake": two swings, eased at both ends
    return np.sin(2 * math.pi * t) * np.sin(math.pi * t)


def render_motion(still: np.ndarray, m: Motion) -> np.ndarray:
    """(frames, H, W, 3) uint8: ``still`` warped along ``m``, pivoting at the neck."""
    h, w = still.shape[:2]
    pivot = (w / 2, h * 0.92)
    out = np.empty((m.frames, h, w, 3), np.uint8)
    for i, a in enumerate(_weights(m)):
        mat = cv2.getRotationMatrix2D(pivot, m.angle * a, 1.0 + m.scale * a)
        mat[0, 2] += m.dx * a
        mat[1, 2] += m.dy * a
        out[i] = cv2.warpAffine(still, mat, (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT_101)
    return out
