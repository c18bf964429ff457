"""Offline face localisation with the Haar cascades that ship inside OpenCV 4.x wheels.

OpenCV 5.x wheels ship no cascades (and the headless build has no ``CascadeClassifier``):
there :func:`cascade` raises :class:`FaceDetectorUnavailable` naming the fix, rather than
failing somewhere deeper or silently guessing a face box.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import cv2
import numpy as np

from ..errors import ProcessingError

Box = tuple[int, int, int, int]  # x, y, w, h
# a CascadeClassifier is shared (cached) but not thread-safe: two preparations detecting at
# once (a job and a server's start-up) failed inside OpenCV ("scaleIdx" assertion)
_detect_lock = threading.Lock()


class FaceDetectorUnavailable(ProcessingError):
    """This OpenCV has no Haar cascades (OpenCV 5.x): faces cannot be found."""


@cache
def cascade(name: str) -> cv2.CascadeClassifier:
    """A Haar cascade of this OpenCV, or FaceDetectorUnavailable saying how to get one."""
    fix = ("the avatar face detector needs OpenCV 4.x's Haar cascades: install "
           "'opencv-python-headless>=4.8,<5' (this project's pinned range)")
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if folder is None or not hasattr(cv2, "CascadeClassifier"):
        raise FaceDetectorUnavailable(f"OpenCV {cv2.__version__} ships no Haar cascades; {fix}")
    clf = cv2.CascadeClassifier(folder + name)
    if clf.empty():
        raise FaceDetectorUnavailable(f"OpenCV cascade {folder + name} did not load; {fix}")
    return clf


def detect(name: str, gray: np.ndarray, scale_factor: float, min_neighbors: int,
           min_size: tuple[int, int], max_size: tuple[int, int] = (0, 0)) -> Any:
    """``detectMultiScale`` of the cached cascade ``name``, one call at a time: a cached
    CascadeClassifier is not thread-safe (two avatar jobs at once failed inside OpenCV)."""
    with _detect_lock:
        return cascade(name).detectMultiScale(gray, scale_factor, min_neighbors,
                                              minSize=min_size, maxSize=max_size)


def detect_face(rgb: np.ndarray) -> Box | None:
    """The largest frontal face in an RGB image, or None."""
    gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    min_side = max(24, min(gray.shape) // 12)
    for name in ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml"):
        faces = detect(name, gray, 1.1, 5, (min_side, min_side))
        if len(faces):
            x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
            return int(x), int(y), int(w), int(h)
    return None


def crop_box_for_face(face: Box, scale: float = 2.2) -> Box:
    """A square crop centred a little below the face centre, so chin and neck are in view."""
    x, y, w, h = face
    side = int(round(max(w, h) * scale))
    cx = x + w / 2
    cy = y + h / 2 + 0.22 * h
    return int(round(cx - side / 2)), int(round(cy - side / 2)), side, side


def cut(rgb: np.ndarray, box: Box, out_w: int, out_h: int) -> np.ndarray:
    """Crop ``box`` (may extend past the image: edges are reflected) and resize."""
    x, y, w, h = box
    H, W = rgb.shape[:2]
    pad = max(0, -x, -y, x + w - W, y + h - H)
    src = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT_101) if pad else rgb
    crop = src[y + pad : y + pad + h, x + pad : x + pad + w]
    interp = cv2.INTER_AREA if w > out_w else cv2.INTER_CUBIC
    return cv2.resize(crop, (out_w, out_h), interpolation=interp)
