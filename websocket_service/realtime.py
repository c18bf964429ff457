"""Server-side speech: an audio file decoded to 16 kHz mono and played into a session.

A server-side session has no client to send audio, so an :class:`AudioFeeder` does: it
pushes the file's PCM in small pieces against absolute deadlines on the session manager's
clock, ``LEAD_S`` ahead of real time (the engine needs a little look-ahead) and never
further, so what waits in the session stays far below ``MAX_BUFFERED_AUDIO_S``. If the
session refuses a piece anyway (the engine fell behind), the feeder waits and retries the
same piece: nothing is skipped, nothing piles up. The session manager owns the feeder
(:meth:`SessionManager.attach`) and cancels it when the session closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from pathlib import Path

import av
import numpy as np

from .clock import Clock
from .errors import InvalidMessage, ProcessingError, RateLimitExceeded
from .session import Session
from .units import SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)

MAX_AUDIO_S = 600.0  # longest file a realtime session plays (19 MB of PCM)
PIECE = 3 * SAMPLES_PER_FRAME  # 120 ms per push: well inside SPEECH_GAP_MS
LEAD_S = 0.4
RETRY_S = 0.2


def read_audio(path: Path, max_seconds: float = MAX_AUDIO_S) -> np.ndarray:
    """The first audio stream of ``path`` (WAV at any rate, channel count or sample format,
    or anything else FFmpeg decodes) as int16 mono at 16 kHz. Blocking: run in a thread."""
    limit = int(max_seconds * SAMPLE_RATE)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    parts: list[np.ndarray] = []
    total = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            for frame in itertools.chain(container.decode(stream), [None]):  # None: flush
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    total += len(parts[-1])
                if total > limit:
                    raise InvalidMessage(f"{path.name} is longer than {max_seconds:g} s",
                                         {"max_seconds": max_seconds})
    except (av.error.FFmpegError, IndexError) as exc:
        raise ProcessingError(f"could not decode audio from {path.name}: "
                              f"{exc.__class__.__name__}") from None
    if not total:
        raise ProcessingError(f"{path.name} has no audio samples")
    return np.concatenate(parts).astype(np.int16, copy=False)


class AudioFeeder:
    """Plays ``pcm`` into ``session`` in real time, once, ending the utterance at the end."""

    def __init__(self, session: Session, pcm: np.ndarray, clock: Clock) -> None:
        self.session = session
        self.pcm = pcm
        self.clock = clock
        self.pushed = 0  # samples handed to the session so far
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SAMPLE_RATE

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"feeder-{self.session.session_id[:8]}")

    async def aclose(self) -> None:
        """Stop pushing (idempotent); what was pushed plays on until the session closes."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        t0 = self.clock.now()
        n = len(self.pcm)
        try:
            for start in range(0, n, PIECE):
                await self.clock.sleep_until(t0 + start / SAMPLE_RATE - LEAD_S)
                await self._push(self.pcm[start:start + PIECE], last=start + PIECE >= n)
        except Exception:  # noqa: BLE001 - report, leave the session idling
            log.exception("session %s: feeding audio failed", self.session.session_id)
        finally:
            self.done.set()

    async def _push(self, piece: np.ndarray, last: bool) -> None:
        while True:
            try:
                self.session.push_audio(piece, end_of_speech=last)
            except RateLimitExceeded:  # the engine is behind: wait for it, skip nothing
                await self.clock.sleep_until(self.clock.now() + RETRY_S)
                continue
            self.pushed += len(piece)
            return


__all__ = ["MAX_AUDIO_S", "AudioFeeder", "read_audio"]
