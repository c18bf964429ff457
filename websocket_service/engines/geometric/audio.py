"""Streaming audio analysis: one mouth pose per 40 ms video frame.

Causal with one frame of look-ahead: frame ``n`` is analysed on an 80 ms Hann window centred
on its own slot, ``[640 n - 320, 640 n + 960)``, which ends inside frame ``n + 1``.

Per frame: in-band (100-4000 Hz) level in dBFS; a noise floor (minimum level of the last
2 s, so a real microphone's hiss counts as silence); voice activity (level well above the
floor and above an absolute gate); the opening target (level between a slowly decaying
speech peak minus 28 dB and the peak minus 4 dB, so quiet and loud voices both use the
full range); and the
mouth shape from the second formant, estimated by linear prediction (LPC): a high F2 is a
spread front vowel ("ee", F2 ~2300 Hz), a low F2 a rounded back vowel ("oo", F2 ~900-1400 Hz);
the spectral centroid, which lip rounding hardly moves, is only the fallback when no formant
pair is found. Attack/release smoothing keeps the mouth from flickering; after speech it closes
within three frames and snaps exactly shut.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ...units import SAMPLE_RATE, SAMPLES_PER_FRAME
from .fields import MouthPose

HOP = SAMPLES_PER_FRAME
WINDOW = 2 * HOP
BAND = (100.0, 4000.0)

FLOOR_FRAMES = 50  # 2 s of minimum statistics
FLOOR_START_DB = -55.0  # assumed floor until the history has seen quieter audio
GATE_DB = -58.0  # absolute: quieter than this is never speech
VOICE_SNR_DB = 9.0  # a frame is voiced this far above the floor
PEAK_START_DB = -18.0  # assumed loudest speech level until louder speech is heard
PEAK_DECAY_DB = 0.05  # per frame (1.25 dB/s): the peak follows a speaker who gets quieter
RANGE_DB = 28.0  # opening 0 -> 1 from this far below the peak ...
HEADROOM_DB = 4.0  # ... to this far below it
CENTROID_MID_HZ = 2300.0  # spectral centroid of a neutral mouth shape (fallback)
CENTROID_SPAN_HZ = 700.0
LPC_ORDER = 18  # poles for 16 kHz speech: ~2 per kHz plus a few for the source
F2_MID_HZ = 1650.0  # F2 of a neutral vowel (schwa), between rounded and spread
F2_SPAN_HZ = 550.0
FORMANT_MAX_BW_HZ = 400.0

ATTACK = 0.75  # fraction of the way to a higher target per frame
RELEASE = 0.5  # fraction of the way to a lower target per frame
SHAPE_RATE = 0.5
SNAP = 0.15  # when silent, smaller values close exactly


@dataclass(frozen=True)
class Features:
    level_db: float
    floor_db: float
    voiced: bool
    target: float  # opening target 0..1
    shape: float  # -1 rounded .. +1 spread (0 when silent)


_HANN = np.hanning(WINDOW).astype(np.float32)
_FREQS = np.fft.rfftfreq(WINDOW, 1.0 / SAMPLE_RATE).astype(np.float32)
_IN_BAND = (_FREQS >= BAND[0]) & (_FREQS <= BAND[1])
_NORM = 2.0 / (WINDOW * float(np.sum(_HANN**2)))
_HAMMING = np.hamming(WINDOW)
_TOEPLITZ = np.abs(np.subtract.outer(np.arange(LPC_ORDER), np.arange(LPC_ORDER)))
_SHIFT = np.eye(LPC_ORDER, k=-1)  # companion matrix of a monic polynomial, first row apart


def spectrum_features(samples: np.ndarray) -> tuple[float, float]:
    """(in-band level dBFS, pre-emphasised spectral centroid Hz) of one analysis window."""
    x = samples.astype(np.float32) / 32768.0
    power = np.abs(np.fft.rfft(x * _HANN)) ** 2
    band = power[_IN_BAND]
    level = 10.0 * np.log10(float(band.sum()) * _NORM + 1e-12)
    f = _FREQS[_IN_BAND]
    emph = band * (f / 1000.0) ** 2  # +6 dB/octave, like a pre-emphasis filter
    centroid = float((emph * f).sum() / (emph.sum() + 1e-20))
    return level, centroid


def second_formant(samples: np.ndarray) -> float | None:
    """F2 in Hz from the roots of an LPC polynomial (autocorrelation method), or None.

    Written for few NumPy calls (it runs on the event loop for every voiced frame): the
    autocorrelation is one ``correlate``, the normal equations one ``solve``, and the roots
    the eigenvalues of the companion matrix (what ``np.roots`` computes, without its checks).
    """
    x = samples.astype(np.float64) * (1.0 / 32768.0)
    e = np.empty(len(x) + LPC_ORDER)
    e[0] = x[0]
    np.subtract(x[1:], 0.63 * x[:-1], out=e[1:len(x)])
    e[: len(x)] *= _HAMMING
    e[len(x):] = 0.0
    r = np.correlate(e, e[: len(x)])  # r[k] = sum e[n] e[n + k], k = 0..LPC_ORDER
    if r[0] <= 1e-10:
        return None
    try:
        a = np.linalg.solve(r[_TOEPLITZ], -r[1:])
    except np.linalg.LinAlgError:
        return None
    companion = _SHIFT.copy()
    companion[0] = -a
    roots = np.linalg.eigvals(companion)
    roots = roots[roots.imag > 0]
    freqs = np.angle(roots) * (SAMPLE_RATE / (2 * np.pi))
    bandwidths = np.log(np.abs(roots)) * (-SAMPLE_RATE / np.pi)
    formants = np.sort(freqs[(freqs > 200) & (freqs < 4000) & (bandwidths < FORMANT_MAX_BW_HZ)])
    return float(formants[1]) if len(formants) >= 2 else None


def shape_of(samples: np.ndarray, centroid: float) -> float:
    """-1 rounded .. +1 spread, from F2 (or the spectral centroid when LPC finds no F2)."""
    f2 = second_formant(samples)
    if f2 is None:
        return float(np.clip((centroid - CENTROID_MID_HZ) / CENTROID_SPAN_HZ, -1.0, 1.0))
    return float(np.clip((f2 - F2_MID_HZ) / F2_SPAN_HZ, -1.0, 1.0))


class AudioAnalyzer:
    """Turns successive analysis windows into smoothed mouth poses (one per frame)."""

    def __init__(self) -> None:
        self._levels: deque[float] = deque([FLOOR_START_DB], maxlen=FLOOR_FRAMES)
        self.peak = PEAK_START_DB
        self.opening = 0.0
        self.shape = 0.0

    def reset_mouth(self) -> None:
        """A new utterance starts closed (the noise floor is kept: same microphone)."""
        self.opening = 0.0
        self.shape = 0.0

    def features(self, window: np.ndarray) -> Features:
        level, centroid = spectrum_features(window)
        self._levels.append(level)
        floor = min(self._levels)
        snr = level - floor
        voiced = level > GATE_DB and snr > VOICE_SNR_DB
        target = self._target(level, floor) if voiced else 0.0
        shape = shape_of(window, centroid) if voiced else 0.0
        return Features(level, floor, voiced, target, shape)

    def _target(self, level: float, floor: float) -> float:
        """Opening 0..1: level between the voicing threshold / peak range and the peak."""
        self.peak = max(level, self.peak - PEAK_DECAY_DB)
        low = max(floor + VOICE_SNR_DB, self.peak - RANGE_DB)
        high = max(low + 6.0, self.peak - HEADROOM_DB)
        return float(np.clip((level - low) / (high - low), 0.0, 1.0))

    def step(self, window: np.ndarray) -> tuple[MouthPose, Features]:
        """The pose for the next frame, from its analysis window."""
        f = self.features(window)
        rate = ATTACK if f.target > self.opening else RELEASE
        self.opening += rate * (f.target - self.opening)
        self.shape += SHAPE_RATE * (f.shape * min(1.0, 2.0 * f.target) - self.shape)
        if not f.voiced:
            if self.opening < SNAP:
                self.opening = 0.0
            if abs(self.shape) < SNAP:
                self.shape = 0.0
        return MouthPose(self.opening, self.shape), f
