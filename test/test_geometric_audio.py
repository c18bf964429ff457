"""Streaming audio analysis: silence, loudness, vowel shape, closing, noise floor."""

from __future__ import annotations

import numpy as np
import pytest

from websocket_service.engines.geometric.audio import WINDOW, AudioAnalyzer

from .geometric_support import wav

HOP = 640


def poses(pcm: np.ndarray, analyzer: AudioAnalyzer | None = None):
    """(opening, shape, voiced) per 40 ms frame, with the engine's window placement."""
    a = analyzer or AudioAnalyzer()
    n = -(-len(pcm) // HOP)
    padded = np.concatenate([np.zeros(HOP // 2, np.int16), pcm, np.zeros(WINDOW, np.int16)])
    out = []
    for i in range(n):
        pose, feat = a.step(padded[i * HOP: i * HOP + WINDOW])
        out.append((pose.opening, pose.shape, feat.voiced))
    return np.array(out, np.float64)


def noise(seconds: float, dbfs: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(16000 * seconds)) * (10 ** (dbfs / 20) * 32768)
    return np.clip(x, -32768, 32767).astype(np.int16)


def test_digital_silence_keeps_mouth_closed():
    p = poses(np.zeros(16000, np.int16))
    assert np.all(p[:, 0] == 0.0) and np.all(p[:, 1] == 0.0)


def test_microphone_hiss_keeps_mouth_closed():
    p = poses(noise(3.0, -50.0))
    assert np.all(p[:, 0] == 0.0), p[:, 0].max()


def test_loud_vowel_opens_mouth():
    for name in ("vowel_ee_16k.wav", "vowel_oo_16k.wav"):
        p = poses(wav(name))
        assert np.median(p[2:8, 0]) > 0.7, (name, p[:10, 0])


def test_quieter_frames_open_less():
    pcm = wav("vowel_oo_16k.wav")[: 16000 // 2]
    loud = poses(pcm)[3:10, 0].mean()
    quiet = poses((pcm * 0.1).astype(np.int16))[3:10, 0].mean()
    assert quiet < loud - 0.1


def test_ee_is_spread_and_oo_rounder():
    ee, oo = poses(wav("vowel_ee_16k.wav")), poses(wav("vowel_oo_16k.wav"))
    ee_shape = ee[ee[:, 2] > 0, 1].mean()
    oo_shape = oo[oo[:, 2] > 0, 1].mean()
    assert ee_shape > 0.4
    assert oo_shape < -0.2  # rounded, not merely less spread
    assert ee_shape > oo_shape + 0.8


def _vowel(f1: float, f2: float, f0: float = 120.0, seconds: float = 0.08) -> np.ndarray:
    """A glottal pulse train through two resonators: a vowel with known formants."""
    from scipy.signal import lfilter

    n = int(16000 * seconds)
    x = np.zeros(n)
    x[:: int(16000 / f0)] = 1.0
    for f, bw in ((f1, 80.0), (f2, 120.0)):
        r = np.exp(-np.pi * bw / 16000)
        theta = 2 * np.pi * f / 16000
        x = lfilter([1.0], [1.0, -2 * r * np.cos(theta), r * r], x)
    return (x / np.abs(x).max() * 12000).astype(np.int16)


def test_lpc_finds_the_second_formant_of_synthetic_vowels():
    from websocket_service.engines.geometric.audio import WINDOW, second_formant

    for f1, f2 in ((300, 2300), (350, 900), (500, 1500), (700, 1200)):
        est = second_formant(_vowel(f1, f2)[:WINDOW])
        assert est is not None and abs(est - f2) < 0.1 * f2, (f1, f2, est)


def _textbook_f2(samples: np.ndarray) -> float | None:
    """The same LPC formant estimate by the textbook route (FFT autocorrelation, SciPy's
    Levinson solver, ``np.roots``): the oracle for the few-call version the engine runs."""
    from scipy.linalg import solve_toeplitz

    from websocket_service.engines.geometric.audio import FORMANT_MAX_BW_HZ, LPC_ORDER

    x = samples.astype(np.float64) / 32768.0
    x = np.append(x[0], x[1:] - 0.63 * x[:-1]) * np.hamming(len(x))
    spec = np.fft.rfft(x, 2 * len(x))
    r = np.fft.irfft(spec.real**2 + spec.imag**2)[: LPC_ORDER + 1]
    if r[0] <= 1e-10:
        return None
    a = solve_toeplitz(r[:LPC_ORDER], -r[1:])
    roots = np.roots(np.concatenate([[1.0], a]))
    roots = roots[np.imag(roots) > 0]
    freqs = np.angle(roots) * 16000 / (2 * np.pi)
    bandwidths = -16000 / np.pi * np.log(np.abs(roots))
    formants = np.sort(freqs[(freqs > 200) & (freqs < 4000) & (bandwidths < FORMANT_MAX_BW_HZ)])
    return float(formants[1]) if len(formants) >= 2 else None


def test_second_formant_equals_the_textbook_lpc_on_speech():
    from websocket_service.engines.geometric.audio import WINDOW, second_formant

    pcm = wav("speech_pauses_16k.wav")
    found = 0
    for start in range(0, len(pcm) - WINDOW, HOP):
        x = pcm[start:start + WINDOW]
        want, got = _textbook_f2(x), second_formant(x)
        assert (want is None) == (got is None), start
        if want is not None:
            found += 1
            assert got == pytest.approx(want, abs=1e-6), start
    assert found > 50  # the fixture's voiced frames


def test_closes_within_three_frames_after_speech():
    pcm = np.concatenate([wav("vowel_ee_16k.wav"), np.zeros(16000, np.int16)])
    frames = -(-len(pcm) // HOP)
    level = [np.abs(pcm[i * HOP:(i + 1) * HOP].astype(np.int32)).max() for i in range(frames)]
    last_speech = max(i for i, v in enumerate(level) if v > 300)
    p = poses(pcm)
    assert p[last_speech - 1, 0] > 0.3
    assert np.all(p[last_speech + 3:, 0] == 0.0), p[last_speech:last_speech + 5, 0]
    assert np.all(p[last_speech + 3:, 1] == 0.0)


def test_speech_in_noise_still_opens_and_pauses_close():
    speech = wav("speech_pauses_16k.wav")
    hiss = noise(len(speech) / 16000, -45.0, seed=2)
    mixed = np.clip(speech.astype(np.int32) + hiss, -32768, 32767).astype(np.int16)
    p = poses(mixed)
    clean = poses(speech)
    speaking = clean[:, 0] > 0.5
    assert p[speaking, 0].mean() > 0.5
    # inside the middle pause (after the floor has learnt the hiss) the mouth is shut
    pause = slice(42, 58)  # 1.7-2.3 s: the pause after "Hello there."
    assert np.all(clean[pause, 0] == 0) and np.all(p[pause, 0] == 0), p[pause, 0]


def test_analysis_is_deterministic():
    pcm = wav("short_16k.wav")
    assert np.array_equal(poses(pcm), poses(pcm))
