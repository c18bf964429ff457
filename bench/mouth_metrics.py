"""Mouth activity measured on OUTPUT FRAMES by image analysis only, against audio loudness.

The mouth opening of a frame is the share of dark pixels (the open mouth's cavity) in a
mouth box derived from the avatar's face box, optionally minus the same share in a
reference frame (the base frame the speech frame was drawn on), so an avatar that already
shows some dark pixels at rest starts at zero. Nothing from the engine's internal
parameters is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

FRAME = 640  # samples per 40 ms frame at 16 kHz
DARK_LUMA = 70  # pixels darker than this count as mouth cavity
SPEECH_DB = -40.0  # frames at least this loud are speech ...
SILENCE_DB = -55.0  # ... and at most this loud are silence
GUARD_FRAMES = 3  # silence frames this close to speech are the allowed closing time


def mouth_box(face_box: Sequence[float], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the lower-middle part of a Haar face box, where the mouth is."""
    x, y, w, h = face_box
    x0, x1 = int(max(0, x + 0.2 * w)), int(min(shape[1], x + 0.8 * w))
    y0, y1 = int(max(0, y + 0.62 * h)), int(min(shape[0], y + 1.02 * h))
    return x0, y0, x1, y1


def dark_share(frame: np.ndarray, face_box: Sequence[float]) -> float:
    """Share (0..1) of dark pixels in the mouth box of an RGB frame."""
    x0, y0, x1, y1 = mouth_box(face_box, frame.shape)
    luma = cv2.cvtColor(np.ascontiguousarray(frame[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    return float((luma < DARK_LUMA).mean())


def mouth_opening(frame: np.ndarray, face_box: Sequence[float],
                  reference: np.ndarray | None = None) -> float:
    """Dark share of ``frame`` (minus that of ``reference``, floored at 0)."""
    share = dark_share(frame, face_box)
    if reference is not None:
        share = max(0.0, share - dark_share(reference, face_box))
    return share


def loudness_envelope(pcm: np.ndarray, floor_db: float = -60.0) -> np.ndarray:
    """RMS level in dBFS (floored) of each 40 ms frame of int16 16 kHz audio."""
    n = -(-len(pcm) // FRAME)
    x = np.zeros(n * FRAME, np.float64)
    x[: len(pcm)] = pcm.astype(np.float64) / 32768.0
    rms = np.sqrt((x.reshape(n, FRAME) ** 2).mean(axis=1))
    return np.maximum(20.0 * np.log10(rms + 1e-12), floor_db)


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def silence_ratio(opening: Sequence[float], loudness: Sequence[float]) -> float:
    """Mean mouth opening in silence / in speech (silence near speech excluded)."""
    o, db = np.asarray(opening, np.float64), np.asarray(loudness, np.float64)
    speech = db >= SPEECH_DB
    near = np.convolve(speech.astype(float), np.ones(2 * GUARD_FRAMES + 1), "same") > 0
    silence = (db <= SILENCE_DB) & ~near
    if not speech.any() or not silence.any():
        raise ValueError("need both speech and silence frames")
    return float(o[silence].mean() / max(o[speech].mean(), 1e-9))


def evaluate(frames: Sequence[np.ndarray], pcm: np.ndarray, face_box: Sequence[float],
             references: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """{'r', 'silence_ratio', 'frames'} of rendered frames against their audio."""
    loud = loudness_envelope(pcm)[: len(frames)]
    refs = references if references is not None else [None] * len(frames)
    opening = [mouth_opening(f, face_box, r) for f, r in zip(frames, refs, strict=True)]
    return {"r": pearson(opening, loud), "silence_ratio": silence_ratio(opening, loud),
            "frames": float(len(frames))}
