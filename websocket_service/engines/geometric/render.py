"""Rendering one speech frame: warp the lower face, paint the interior, feather it in.

Work happens in a small axis-aligned box (the ROI) that starts at the nose line of the frame
and covers the mouth, jaw and chin. The local fields (:mod:`.fields`) are built per pose,
rotated/scaled/moved onto the ROI with one ``warpAffine`` per layer, and the frame is
resampled once with ``cv2.remap``. Rows above the nose line are never written.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from .fields import LocalGrid, MouthPose, displacement, smoothstep
from .geometry import ANGLE, CX, CY, NOSE_Y, WIDTH
from .interior import interior

IDLE_EPS = 0.01  # below this opening and shape the frame is returned untouched


class MouthRenderer:
    """Renders poses on frames of one avatar (thread-safe: holds only read-only arrays)."""

    def __init__(self, median_mouth: float, paint_teeth: bool = True, bend: float = 0.0,
                 nose: float | None = None, step: float = 2.0) -> None:
        self.grid = LocalGrid.for_mouth(median_mouth, step, nose)
        m = median_mouth
        self.roi_w = int(round(2.3 * m)) + 2 * int(0.06 * m)
        self.roi_h = int(np.ceil((self.grid.height + 1) * step)) + int(0.06 * m)
        self.feather = _feather(self.roi_h, self.roi_w, int(0.1 * m))
        self.unfeather = (1.0 - self.feather).astype(np.float32)
        ys, xs = np.mgrid[0:self.roi_h, 0:self.roi_w].astype(np.float32)
        self._xs, self._ys = xs, ys
        # poses are quantised (1/64 opening, 1/32 shape) so these caches hit in speech
        self._displacement = lru_cache(maxsize=128)(lambda p: displacement(self.grid, p, bend))
        self._interior = lru_cache(maxsize=256)(lambda p: interior(median_mouth, p, paint_teeth, bend))

    def render(self, image: np.ndarray, geo: np.ndarray, pose: MouthPose) -> np.ndarray:
        """A copy of ``image`` with the mouth in ``pose``; ``geo`` is the frame's geometry row."""
        out = image.copy()
        pose = pose.quantised()
        if pose.opening < IDLE_EPS and abs(pose.shape) < IDLE_EPS:
            return out
        box = self._roi(image.shape, geo)
        if box is None:
            return out
        x0, y0, x1, y1, fx = box
        to_roi = self._to_roi(geo, x0, y0)
        mx, my = self._maps(to_roi, pose, x0, y0, x1 - x0, y1 - y0)
        warped = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self._composite(warped, to_roi, pose)
        sl = (slice(0, y1 - y0), slice(fx, fx + x1 - x0))
        out[y0:y1, x0:x1] = cv2.blendLinear(warped, image[y0:y1, x0:x1],
                                            self.feather[sl], self.unfeather[sl])
        return out

    def _roi(self, shape, geo) -> tuple[int, int, int, int, int] | None:
        """(x0, y0, x1, y1, feather column offset): the ROI clipped to the frame.

        Its top is the nose line, so nothing above the nose is ever written.
        """
        h, w = shape[:2]
        y0 = max(0, int(math.ceil(geo[NOSE_Y])))
        xu = int(round(geo[CX] - self.roi_w / 2))
        x1, y1 = min(w, xu + self.roi_w), min(h, y0 + self.roi_h)
        x0 = max(0, xu)
        return None if x1 - x0 < 8 or y1 - y0 < 8 else (x0, y0, x1, y1, x0 - xu)

    def _to_roi(self, geo, x0: int, y0: int) -> np.ndarray:
        """2x3 matrix: local mouth coordinates (avatar px) -> ROI pixel."""
        s = float(geo[WIDTH]) / self.grid.mouth
        c, n = s * math.cos(float(geo[ANGLE])), s * math.sin(float(geo[ANGLE]))
        return np.array([[c, -n, geo[CX] - x0], [n, c, geo[CY] - y0]], np.float64)

    def _maps(self, to_roi, pose, x0, y0, w, h) -> tuple[np.ndarray, np.ndarray]:
        """remap() coordinates for the ROI, in full-frame pixels."""
        g = self.grid
        d = self._displacement(pose)
        lin = to_roi[:, :2].astype(np.float32)
        d = (d.reshape(-1, 2) @ lin.T).reshape(d.shape)  # local vectors -> ROI vectors
        cell = to_roi.copy()  # grid cell -> half-resolution ROI pixel
        cell[:, :2] *= g.step / 2
        cell[:, 2] = (cell[:, 2] - 0.5) / 2 - cell[:, 0] * g.ou - cell[:, 1] * g.ov
        half = ((w + 1) // 2, (h + 1) // 2)
        d = cv2.warpAffine(d, cell, half, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        d = cv2.resize(d, (half[0] * 2, half[1] * 2), interpolation=cv2.INTER_LINEAR)[:h, :w]
        return self._xs[:h, :w] + (x0 - d[..., 0]), self._ys[:h, :w] + (y0 - d[..., 1])

    def _composite(self, warped: np.ndarray, to_roi: np.ndarray, pose: MouthPose) -> None:
        """Lay the interior over the warped ROI, in place, on the box it covers only."""
        layer = self._interior(pose)
        if layer is None:
            return
        rgb, alpha, u0, v0 = layer
        m = to_roi.copy()
        m[:, 2] += m[:, 0] * u0 + m[:, 1] * v0
        ph, pw = alpha.shape
        corners = np.array([[0, 0, 1], [pw, 0, 1], [0, ph, 1], [pw, ph, 1]], np.float64) @ m.T
        bx0, by0 = np.floor(corners.min(axis=0)).astype(int)
        bx1, by1 = np.ceil(corners.max(axis=0)).astype(int)
        bx0, by0 = max(bx0, 0), max(by0, 0)
        bx1, by1 = min(bx1, warped.shape[1]), min(by1, warped.shape[0])
        if bx1 - bx0 < 1 or by1 - by0 < 1:
            return
        m[:, 2] -= (bx0, by0)
        size = (bx1 - bx0, by1 - by0)
        a = cv2.warpAffine(alpha, m, size, flags=cv2.INTER_LINEAR, borderValue=0)
        c = cv2.warpAffine(rgb, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        sub = warped[by0:by1, bx0:bx1]
        sub[:] = cv2.blendLinear(c, sub, a, (1.0 - a).astype(np.float32))


def _feather(h: int, w: int, ramp: int) -> np.ndarray:
    """A mask 1 inside, easing to exactly 0 over ``ramp`` px at the sides and bottom."""
    ramp = max(2, ramp)
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)
    fx = smoothstep(0, ramp, xs) * smoothstep(0, ramp, w - 1 - xs)
    fy = smoothstep(0, 3, ys) * smoothstep(0, ramp, h - 1 - ys)
    return np.multiply.outer(fy, fx).astype(np.float32)
