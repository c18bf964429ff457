"""The mouth interior painted between the parted lips: dark cavity, upper teeth, tongue.

Drawn in local mouth coordinates (see :mod:`.fields`) on the small box that the gap covers,
as RGB plus alpha, with anti-aliased edges.
"""

from __future__ import annotations

import numpy as np

from .fields import CAVITY, LIP_INNER, TEETH, TONGUE, MouthPose, lens, lip_curve

EDGE = 2.0  # px of anti-aliasing at the inner lip edges


def _ramp(x: np.ndarray) -> np.ndarray:
    return np.clip(x / EDGE + 0.5, 0.0, 1.0)


def interior(m: float, pose: MouthPose, teeth: bool = True,
             bend: float = 0.0) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """(RGB uint8, alpha float32, u0, v0): the interior at 1 px per avatar pixel, whose
    top-left pixel sits at local (u0, v0) for a mouth ``m`` px wide; None when closed.

    ``teeth``: paint upper teeth (off when the avatar's own teeth already show at rest:
    they stay with the upper lip and sit right above the cavity)."""
    lift, drop, half, power = pose.gaps(m)
    if lift + drop < 1.0:
        return None
    c0, c1 = -int(np.ceil(half)) - 2, int(np.ceil(half)) + 3
    u = np.arange(c0, c1, dtype=np.float32)
    curve = lip_curve(u, m, bend)
    r0 = int(np.floor(curve.min() - lift)) - 2
    r1 = int(np.ceil(curve.max() + drop)) + 3
    v = np.arange(r0, r1, dtype=np.float32)[:, None]
    gap = lens(u, half, power)[None, :]
    top, bot = curve - lift * gap, curve + drop * gap
    alpha = _ramp(v - top) * _ramp(bot - v)
    height = np.maximum(bot - top, 1e-3)
    depth = np.minimum(v - top, bot - v) / (0.5 * height + 1e-3)  # 0 at lips, 1 in the middle
    shade = np.clip(depth, 0.0, 1.0)[..., None]
    rgb = LIP_INNER + (CAVITY - LIP_INNER) * np.sqrt(shade)
    if teeth:
        rgb = _teeth(rgb, u, v, top, height, half, m)
    rgb = _tongue(rgb, u, v, bot, height, half)
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return rgb, alpha.astype(np.float32), c0, r0


def _teeth(rgb, u, v, top, height, half, m) -> np.ndarray:
    """A band of upper teeth just under the upper lip, shaded darker towards the corners."""
    span = lens(u, 0.8 * half, 0.35)[None, :]
    band = np.minimum(0.085 * m, 0.42 * height) * span
    a = _ramp(top + band - v) * _ramp(v - top) * (band > 0.6)
    shade = (0.5 + 0.5 * span) * (1.0 - 0.25 * np.clip((v - top) / np.maximum(band, 1e-3), 0, 1))
    teeth = TEETH * shade[..., None]
    return rgb + (teeth - rgb) * a[..., None]


def _tongue(rgb, u, v, bot, height, half) -> np.ndarray:
    """A soft reddish tongue near the lower lip, visible only when the mouth is well open."""
    span = lens(u, 0.65 * half, 0.5)[None, :]
    rise = 0.32 * height * span
    a = np.clip((v - (bot - rise)) / 3.0, 0.0, 1.0) * np.clip(height / 14.0 - 0.3, 0.0, 0.75)
    return rgb + (TONGUE - rgb) * (a * (rise > 1.0))[..., None]
