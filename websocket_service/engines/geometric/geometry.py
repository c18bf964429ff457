"""Mouth localisation on avatar frames, offline, with tools that ship inside OpenCV.

Per frame: the face (Haar frontal-face cascade, searched near the previous face), a mouth
candidate (Haar smile cascade in the lower face), refined by lip colour (Lab a*, redder than
the cheeks) and dark mouth pixels, and the line where the lips meet (darkest horizontal
valley across the middle of the mouth). Each frame gives one row of :data:`FIELDS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...avatars.face import detect

#: columns of a geometry row, in output pixels / radians
FIELDS = ("cx", "cy", "width", "angle", "nose_y", "face_found", "mouth_found", "teeth",
          "curve")
CX, CY, WIDTH, ANGLE, NOSE_Y, FACE_FOUND, MOUTH_FOUND, TEETH, CURVE = range(len(FIELDS))

#: the nose line sits this many mouth widths above the lip line (below the nose tip)
NOSE_ABOVE = 0.28
DETECT_SIDE = 256  # a full-frame face search runs on a copy this wide
FACE_SIDE = 96  # a search near the previous face runs where that face is this wide
SMILE_FACE_SIDE = 128  # the smile cascade runs where the face is this wide
CASCADE_EVERY = 8  # frames; in between, the mouth is tracked from the previous frame

Box = tuple[float, float, float, float]


@dataclass
class Mouth:
    cx: float
    cy: float
    width: float
    angle: float
    found: bool
    teeth: bool = False  # upper teeth visible at rest
    curve: float = 0.0  # the lip line is y = cy + curve * (x - cx)**2 (negative: a smile)
    top: float | None = None  # top of the upper lip
    box_cy: float | None = None  # centre row of the lips' box (for tracking)

    @property
    def nose_y(self) -> float:
        """A line under the nose: above the upper lip, at most NOSE_ABOVE widths up."""
        y = self.cy - NOSE_ABOVE * self.width
        return y if self.top is None else min(y, self.top - 0.1 * self.width)


def default_mouth(face: Box) -> Mouth:
    """Where a mouth usually is in a Haar face box (used when the image gives no answer)."""
    x, y, w, h = face
    return Mouth(x + 0.5 * w, y + 0.8 * h, 0.42 * w, 0.0, False)


def _faces(gray: np.ndarray, scale: float, min_side: int, max_side: int) -> Box | None:
    small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    small = cv2.equalizeHist(small)
    for name in ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml"):
        faces = detect(name, small, 1.08, 4, (min_side, min_side), (max_side, max_side))
        if len(faces):
            x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
            return x / scale, y / scale, w / scale, h / scale
    return None


def detect_face_near(gray: np.ndarray, prev: Box | None) -> Box | None:
    """The largest frontal face: first near ``prev`` (small and fast), then anywhere."""
    if prev is not None:
        px, py, pw, ph = prev
        x0, y0 = int(max(0, px - 0.4 * pw)), int(max(0, py - 0.4 * ph))
        x1, y1 = int(min(gray.shape[1], px + 1.4 * pw)), int(min(gray.shape[0], py + 1.4 * ph))
        scale = FACE_SIDE / max(pw, 1.0)
        face = _faces(gray[y0:y1, x0:x1], scale, int(0.7 * FACE_SIDE), int(1.45 * FACE_SIDE))
        if face is not None:
            return face[0] + x0, face[1] + y0, face[2], face[3]
    scale = DETECT_SIDE / max(gray.shape)
    return _faces(gray, scale, max(24, int(DETECT_SIDE / 6)), DETECT_SIDE)


def _region(face: Box, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The lower-face search region (x0, y0, x1, y1), clipped to the image."""
    x, y, w, h = face
    x0, x1 = int(max(0, x + 0.12 * w)), int(min(shape[1], x + 0.88 * w))
    y0, y1 = int(max(0, y + 0.58 * h)), int(min(shape[0], y + 1.05 * h))
    return x0, y0, x1, y1


def _smile_hint(gray_region: np.ndarray, face_w: float) -> tuple[float, float, float] | None:
    """(cx, cy, width) of the most central plausible smile-cascade box, region coordinates."""
    scale = min(1.0, SMILE_FACE_SIDE / max(face_w, 1.0))
    small = cv2.resize(gray_region, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    min_w = max(36, int(0.22 * face_w * scale))
    boxes = detect("haarcascade_smile.xml", small, 1.1, 8, (min_w, max(18, min_w // 3)))
    rh, rw = small.shape
    best, best_d = None, 1e9
    for bx, by, bw, bh in boxes:
        if bw > 0.75 * face_w * scale:
            continue
        d = abs(bx + bw / 2 - rw / 2) + 0.5 * abs(by + bh / 2 - rh * 0.5)
        if d < best_d:
            best, best_d = ((bx + bw / 2) / scale, (by + bh / 2) / scale, bw / scale), d
    return best


def _mouth_mask(lab: np.ndarray, cx: float, cy: float, width: float) -> np.ndarray:
    """Lip-coloured or dark pixels inside an ellipse around the mouth guess (uint8 0/1)."""
    a = lab[..., 1].astype(np.float32)
    lum = lab[..., 0].astype(np.float32)
    skin_a, skin_l = float(np.median(a)), float(np.median(lum))
    spread = float(np.percentile(a, 90) - skin_a)
    lips = a > skin_a + max(5.0, 0.6 * spread)
    dark = lum < 0.55 * skin_l
    ell = np.zeros(a.shape, np.uint8)
    cv2.ellipse(ell, (int(cx), int(cy)), (max(2, int(0.7 * width)), max(2, int(0.25 * width))),
                0, 0, 360, 1, -1)
    mask: np.ndarray = ((lips | dark) & (ell > 0)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)


def _central_blob(mask: np.ndarray, cx: float, cy: float) -> np.ndarray | None:
    """The largest connected component, if it is near the row of the mouth guess."""
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[best, cv2.CC_STAT_AREA] < 12 or abs(cents[best][1] - cy) > 0.3 * mask.shape[0]:
        return None
    return labels == best


def _lip_line(lab: np.ndarray, x0: int, x1: int, y0: int,
              y1: int) -> tuple[float, bool, float]:
    """(row where the mouth parts at its centre, teeth visible, curvature 1/px).

    Per column over the middle 70 % of the mouth: the row under visible upper teeth, else
    the darkest row of the middle band (the valley between the lips); a parabola through
    them gives the centre row and how much the line bends (negative: corners up, a smile).
    """
    c0, c1 = x0 + (x1 - x0) * 3 // 20, x1 - (x1 - x0) * 3 // 20
    if c1 - c0 < 4 or y1 - y0 < 4:
        return (y0 + y1) / 2, False, 0.0
    box = lab[y0:y1 + 1, c0:c1].astype(np.float32)
    lum, red = box[..., 0], box[..., 1]
    skin_l, skin_a = float(np.median(lab[..., 0])), float(np.median(lab[..., 1]))
    teeth = (lum > skin_l + 12) & (red < skin_a - 3)  # brighter and less red than skin
    cols: np.ndarray = np.asarray(teeth.any(axis=0))
    has_teeth = bool(cols[len(cols) // 4: -len(cols) // 4].mean() > 0.6)
    if has_teeth:  # the lower lip starts under the first run of teeth from the top
        below = (np.cumsum(teeth, axis=0) > 0) & ~teeth
        below[-1] = True
        rows = np.argmax(below, axis=0).astype(np.float32)
    else:
        top, bot = (y1 - y0) // 4, (y1 - y0) - (y1 - y0) // 4 + 1
        band = cv2.blur(lum[top:bot], (3, 3))
        rows, cols = (top + np.argmin(band, axis=0)).astype(np.float32), np.ones_like(cols)
    xs = np.arange(c0, c1, dtype=np.float32) - (x0 + x1) / 2
    if cols.sum() < 5:
        return (y0 + y1) / 2, has_teeth, 0.0
    k, b, c = np.polyfit(xs[cols], rows[cols], 2)
    width = float(x1 - x0)
    k = float(np.clip(k, -2.0 / width, 2.0 / width))
    return float(y0 + c), has_teeth, k


def _angle(blob: np.ndarray) -> float:
    """Orientation of the mouth blob's principal axis (radians, clipped to +-0.35)."""
    m = cv2.moments(blob.astype(np.uint8), binaryImage=True)
    if m["m00"] < 1:
        return 0.0
    theta = 0.5 * np.arctan2(2 * m["mu11"], m["mu20"] - m["mu02"])
    return float(np.clip(theta, -0.35, 0.35))


def locate_mouth(rgb: np.ndarray, gray: np.ndarray, face: Box,
                 track: tuple[float, float, float] | None = None) -> Mouth:
    """The mouth in one frame, given its face box (falls back to :func:`default_mouth`).

    ``track``: (cx, cy, width) of the mouth box in the previous frame, used instead of the
    smile cascade (tracking; the cascade runs when there is none).
    """
    guess = default_mouth(face)
    x0, y0, x1, y1 = _region(face, rgb.shape)
    if x1 - x0 < 16 or y1 - y0 < 8:
        return guess
    hint = ((track[0] - x0, track[1] - y0, track[2]) if track
            else _smile_hint(gray[y0:y1, x0:x1], face[2]))
    cx, cy, width = hint if hint else (guess.cx - x0, guess.cy - y0, guess.width)
    lab = cv2.cvtColor(rgb[y0:y1, x0:x1], cv2.COLOR_RGB2LAB)
    blob = _central_blob(_mouth_mask(lab, cx, cy, width), cx, cy)
    if blob is None:
        return Mouth(cx + x0, cy + y0, width, 0.0, hint is not None)
    ys, xs = np.nonzero(blob)
    bw = float(xs.max() - xs.min() + 1)
    if not 0.22 * face[2] <= bw <= 0.75 * face[2]:
        return Mouth(cx + x0, cy + y0, width, 0.0, hint is not None)
    line, teeth, curve = _lip_line(lab, int(xs.min()), int(xs.max()), int(ys.min()),
                                   int(ys.max()))
    mx = (xs.min() + xs.max()) / 2
    return Mouth(float(mx + x0), line + y0, bw, _angle(blob), True, teeth, curve,
                 float(ys.min() + y0), float((ys.min() + ys.max()) / 2 + y0))


def smooth_track(rows: np.ndarray, radius: int = 2) -> np.ndarray:
    """Median- then mean-filter the geometry of consecutive frames (offline: no lag)."""
    out = rows.copy()
    n = len(rows)
    if n < 3:
        return out
    cols = [CX, CY, WIDTH, ANGLE, NOSE_Y]
    pad = np.pad(rows[:, cols], ((radius, radius), (0, 0)), mode="edge")
    med = np.stack([np.median(pad[i:i + 2 * radius + 1], axis=0) for i in range(n)])
    pad = np.pad(med, ((1, 1), (0, 0)), mode="edge")
    out[:, cols] = (pad[:-2] + pad[1:-1] + pad[2:]) / 3
    out[:, NOSE_Y] = np.minimum(out[:, NOSE_Y], rows[:, NOSE_Y])  # never lower than found
    return out


def analyse_clip(frames: np.ndarray, face0: Box, report: dict) -> np.ndarray:
    """(N, len(FIELDS)) float32 geometry of every frame.

    A frame where no face is found keeps the last good geometry (or, before any, the mouth
    located in ``face0``); ``report`` counts such frames.
    """
    rows = np.zeros((len(frames), len(FIELDS)), np.float32)
    last_face: Box = face0
    last_row: np.ndarray | None = None
    track = None
    for i, rgb in enumerate(frames):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        face = detect_face_near(gray, last_face)
        if face is None:
            report["face_missing"] = report.get("face_missing", 0) + 1
            if last_row is not None:
                rows[i] = last_row
                rows[i, FACE_FOUND] = rows[i, MOUTH_FOUND] = 0
                continue
        m = locate_mouth(rgb, gray, face or last_face, track if i % CASCADE_EVERY else None)
        track = (m.cx, m.box_cy, m.width) if m.found and m.box_cy is not None else None
        rows[i] = (m.cx, m.cy, m.width, m.angle, m.nose_y,
                   face is not None, m.found, m.teeth, m.curve)
        if face is not None:
            last_face, last_row = face, rows[i].copy()
    return smooth_track(rows)
