"""Deformation fields and the mouth interior, in the mouth's own (local) coordinates.

Local coordinates: ``u`` to the right and ``v`` down, in pixels at the avatar's median mouth
width ``M``, with the origin where the lips meet. Every field here is a sum of outer
products of 1-D profiles (cheap to build per frame) and reaches exactly zero before the
nose line and before the edges of the local grid, so the warp never shows a seam.

Displacements are backward: the output pixel at ``p`` shows the source pixel ``p - d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import NOSE_ABOVE

# Shape of the motion, in mouth widths (M) at full opening.
JAW_DROP = 0.26  # lower lip / chin drop
LIP_LIFT = 0.07  # upper lip lift
SPREAD_GAIN = 0.16  # horizontal stretch (+) or pucker (-) at full shape
CHIN_BELOW = 0.8  # the chin moves rigidly down to here, then the neck absorbs it

CAVITY = np.array([22.0, 7.0, 9.0], np.float32)
LIP_INNER = np.array([104.0, 40.0, 44.0], np.float32)
TEETH = np.array([232.0, 224.0, 210.0], np.float32)
TONGUE = np.array([158.0, 72.0, 78.0], np.float32)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def lens(u: np.ndarray, half: float, power: float) -> np.ndarray:
    """A mouth-opening profile: 1 at the centre, 0 at and beyond the corners (``half``)."""
    return np.clip(1.0 - (u / max(half, 1e-3)) ** 2, 0.0, 1.0) ** power


@dataclass(frozen=True)
class LocalGrid:
    """The local grid of one avatar: size and origin, fixed by the median mouth width."""

    mouth: float  # M, px
    nose: float  # px from the lip line up to the nose line (nothing above it moves)
    step: float  # px of the avatar per grid cell (fields are smooth: a coarse grid is enough)
    width: int
    height: int
    ou: float  # origin column
    ov: float  # origin row (the lip line)

    @classmethod
    def for_mouth(cls, mouth: float, step: float = 1.0, nose: float | None = None) -> LocalGrid:
        nose = NOSE_ABOVE * mouth if nose is None else nose
        up = int(np.ceil(nose / step)) + 1
        width = int(round(2.3 * mouth / step)) | 1
        height = up + int(round(1.3 * mouth / step))
        return cls(float(mouth), float(nose), step, width, height, width // 2, float(up))

    @property
    def u(self) -> np.ndarray:
        """Column positions in avatar pixels from the origin."""
        return (np.arange(self.width, dtype=np.float32) - self.ou) * self.step

    @property
    def v(self) -> np.ndarray:
        return (np.arange(self.height, dtype=np.float32) - self.ov) * self.step


@dataclass(frozen=True)
class MouthPose:
    """The mouth's parameters for one frame: opening 0..1, shape -1 (rounded)..+1 (spread)."""

    opening: float
    shape: float

    def quantised(self) -> MouthPose:
        return MouthPose(round(self.opening * 64) / 64, round(self.shape * 32) / 32)

    def gaps(self, m: float) -> tuple[float, float, float, float]:
        """(upper lift, lower drop, corner half-width, lens power) in px."""
        sp, rd = max(self.shape, 0.0), max(-self.shape, 0.0)
        lift = LIP_LIFT * m * self.opening * (1.0 - 0.2 * sp)
        drop = JAW_DROP * m * self.opening * (1.0 - 0.35 * sp + 0.1 * rd)
        half = 0.43 * m * (1.0 + 0.1 * sp - 0.3 * rd)
        return lift, drop, half, 0.7 - 0.2 * rd


def lip_curve(u: np.ndarray, m: float, bend: float) -> np.ndarray:
    """Row of the lip line at ``u``: ``bend`` (curvature x M) < 0 lifts the corners."""
    return (bend / m) * u * u


def displacement(grid: LocalGrid, pose: MouthPose, bend: float = 0.0) -> np.ndarray:
    """(H, W, 2) float32 backward displacement (du, dv) on the local grid.

    Above the (curved) lip line the upper lip lifts, fading out at the nose line; below it
    the lower lip and the chin drop, fading out under the chin.
    """
    m, u, v = grid.mouth, grid.u, grid.v
    lift, drop, half, power = pose.gaps(m)
    gap = lens(u, half, power)
    curve = lip_curve(u, m, bend)
    nose = -0.92 * grid.nose
    rel = v[:, None] - curve[None, :]  # rows relative to the lip line
    up_fall = np.clip((v[:, None] - nose) / (curve - nose)[None, :], 0.0, 1.0)
    upper = (-lift * gap) * (up_fall * up_fall * (3.0 - 2.0 * up_fall))
    blend = smoothstep(0.0, 0.3 * m, rel)
    fall = (1.0 - smoothstep(CHIN_BELOW * m, v[-1] - 2.0 * grid.step, v))[:, None]
    lower = drop * fall * (gap + (lens(u, 1.05 * m, 2.0) - gap) * blend)
    dv = np.where(rel < 0, upper, lower)
    side = u * lens(u, 0.95 * m, 2.0)
    around = np.exp(-((v / (0.32 * m)) ** 2)) * smoothstep(nose, 0.4 * nose, v)
    du = np.multiply.outer(around * (SPREAD_GAIN * pose.shape), side)
    return np.dstack([du, dv]).astype(np.float32)
