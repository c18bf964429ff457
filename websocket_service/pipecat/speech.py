"""TTS audio as the avatar needs it: 16 kHz mono for the engine, 40 ms of the original per image.

TTS services deliver audio at their own rate (24 kHz is common), mono or stereo, in chunks
of any size. The engine wants 16 kHz mono; the listener should hear the original. An
:class:`Utterance` keeps both views of one TTS reply: it resamples what arrives (pipecat's
stream resampler, flushed at the end) and hands out the original audio that plays with
image ``n``: sample frames ``[round(n R / 25), round((n + 1) R / 25))`` at rate ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import Frame

from ..units import SAMPLE_RATE, SAMPLES_PER_FRAME

FPS = SAMPLE_RATE // SAMPLES_PER_FRAME  # 25 images per second of speech


def to_mono(audio: bytes, channels: int) -> np.ndarray:
    """int16 interleaved PCM -> int16 mono (channels averaged)."""
    pcm = np.frombuffer(audio, np.int16)
    if channels == 1:
        return pcm
    usable = len(pcm) - len(pcm) % channels
    return pcm[:usable].reshape(-1, channels).mean(axis=1).astype(np.int16)


@dataclass
class Utterance:
    """One TTS reply, from its first audio to its last image."""

    rate: int
    channels: int
    context_id: str | None = None
    ended: bool = False
    engine_id: int | None = None  # the engine stream's utterance id, once its first image is out
    engine_samples: int = 0  # 16 kHz samples given to the engine
    offset: int = 0  # remote mode: 16 kHz samples sent before this utterance
    stopped: Frame | None = None  # the TTSStoppedFrame, passed on after the last image
    _pcm: bytearray = field(default_factory=bytearray)  # original audio not yet handed out
    _start: int = 0  # sample frame (per channel) of _pcm[0] within the utterance

    def __post_init__(self) -> None:
        # cleared only at the end (flush) or on interruption, never by a timer
        self._resampler = create_stream_resampler(clear_after_secs=None)

    async def add(self, audio: bytes) -> np.ndarray:
        """Keep the original; return what the engine gets (16 kHz mono, may be empty)."""
        self._pcm.extend(audio)
        mono = to_mono(audio, self.channels)
        out = await self._resampler.resample(mono.tobytes(), self.rate, SAMPLE_RATE)
        return np.frombuffer(out, np.int16)

    async def finish(self) -> np.ndarray:
        """The resampler's tail (16 kHz mono); the utterance takes no more audio."""
        self.ended = True
        if self.rate == SAMPLE_RATE:
            return np.zeros(0, np.int16)
        return np.frombuffer(await self._resampler.flush(), np.int16)

    def audio_for(self, index: int) -> bytes:
        """The original audio that plays with image ``index`` (zero-padded to its length)."""
        return self.audio_at(index * SAMPLES_PER_FRAME)

    def audio_at(self, sample: int) -> bytes:
        """The original audio of the 40 ms that start at 16 kHz sample ``sample``.

        Audio before it is released: calls go forward through the utterance.
        """
        width = 2 * self.channels
        a = round(sample * self.rate / SAMPLE_RATE)
        b = round((sample + SAMPLES_PER_FRAME) * self.rate / SAMPLE_RATE)
        lo = (a - self._start) * width
        chunk = bytes(self._pcm[max(0, lo):lo + (b - a) * width])
        consumed = min(len(self._pcm), max(0, (b - self._start) * width))
        del self._pcm[:consumed]
        self._start += consumed // width
        return chunk + bytes((b - a) * width - len(chunk))
