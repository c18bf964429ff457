"""A frame's picture: RGB or I420, as uint8 NumPy arrays.

* RGB: ``(H, W, 3)``, what the avatars, the weight-free engine and the bridge make;
* I420: ``(H * 3 / 2, W)``, the Y rows then U then V, as OpenCV's ``COLOR_RGB2YUV_I420``
  makes it (BT.601, limited range) and H.264 takes it. The MuseTalk engine blends its faces
  straight into this form (:func:`..engines.musetalk.stream.blend_i420`): the encoder then
  converts nothing, and the blend works on one byte plane and two quarter planes instead of
  three interleaved channels.

The encoders and the WebRTC tracks take either; what needs RGB (pipecat's image frames, a
resize) converts with :func:`to_rgb`.
"""

from __future__ import annotations

import cv2
import numpy as np


def is_i420(img: np.ndarray) -> bool:
    return img.ndim == 2


def frame_size(img: np.ndarray) -> tuple[int, int]:
    """(width, height) of the picture."""
    if is_i420(img):
        return img.shape[1], img.shape[0] * 2 // 3
    return img.shape[1], img.shape[0]


def planes(yuv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U and V of an I420 picture as 2-D views (writing them writes the picture)."""
    width, height = frame_size(yuv)
    flat = yuv.reshape(-1)
    size = width * height
    return (flat[:size].reshape(height, width),
            flat[size:size * 5 // 4].reshape(height // 2, width // 2),
            flat[size * 5 // 4:].reshape(height // 2, width // 2))


def to_rgb(img: np.ndarray) -> np.ndarray:
    """The picture as RGB (itself when it is RGB)."""
    return cv2.cvtColor(img, cv2.COLOR_YUV2RGB_I420) if is_i420(img) else img


def to_i420(img: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
    """The picture as I420, written into ``dst`` when given (the same array then)."""
    if not is_i420(img):
        return cv2.cvtColor(img, cv2.COLOR_RGB2YUV_I420, dst=dst)
    if dst is None:
        return img
    np.copyto(dst, img)
    return dst


def resize_to(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """The picture at ``width`` x ``height``: itself when it is that size, else resized (RGB)."""
    if frame_size(img) == (width, height):
        return img
    return cv2.resize(to_rgb(img), (width, height), interpolation=cv2.INTER_AREA)
