"""Speech from a peer's audio track into a session (the browser microphone path).

Received frames (48 kHz Opus, usually stereo) are resampled to 16 kHz mono s16. All of it
goes to the session's microphone tap (:attr:`Session.mic`: the ``/mic`` socket, ASR); what
the :class:`EnergyGate` lets through goes to :meth:`Session.push_audio`. A piece louder than
``threshold_dbfs`` opens the gate; it closes after ``hangover_ms`` of quiet (that tail is
still pushed). The gate never ends an utterance: silence is simply not pushed, so the
session's own rule (``speech_gap_ms`` without audio) ends it and the avatar goes back to idle
instead of lip-syncing an open microphone's noise.
"""

from __future__ import annotations

import asyncio
import logging

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..engines.base import SAMPLE_RATE
from ..errors import RateLimitExceeded
from ..session import Session

log = logging.getLogger(__name__)


def dbfs(pcm: np.ndarray) -> float:
    if pcm.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    return 20.0 * np.log10(max(rms, 1e-3) / 32768.0)


class EnergyGate:
    """Decides per piece of audio whether it is speech (loud, or the quiet tail just after).

    It does not end utterances: a microphone that stops being pushed is, to the session, a
    client gone quiet, and the session's one rule (``speech_gap_ms``) ends the utterance.
    """

    def __init__(self, threshold_dbfs: float = -45.0, hangover_ms: int = 300) -> None:
        self.threshold = threshold_dbfs
        self.hangover = hangover_ms * SAMPLE_RATE // 1000
        self.talking = False
        self._quiet = 0

    def feed(self, pcm: np.ndarray) -> bool:
        """Whether to push this piece."""
        if dbfs(pcm) > self.threshold:
            self.talking = True
            self._quiet = 0
            return True
        if not self.talking:
            return False
        self._quiet += len(pcm)
        if self._quiet >= self.hangover:
            self.talking = False
            self._quiet = 0
        return True


class MicIngest:
    """Reads one remote audio track until it ends; owned and cancelled by the peer."""

    def __init__(self, track: MediaStreamTrack, session: Session,
                 gate: EnergyGate | None = None) -> None:
        self.track = track
        self.session = session
        self.gate = gate or EnergyGate()
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self.pushed_samples = 0
        self.dropped_samples = 0

    def _to_pcm(self, frame: av.AudioFrame) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for f in self.resampler.resample(frame)]
        return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)

    async def run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            pcm = self._to_pcm(frame)
            if pcm.size == 0:
                continue
            self.session.mic.publish(pcm)  # all of it, for applications (e.g. ASR)
            if self.gate.feed(pcm):
                self._push(pcm)
            await asyncio.sleep(0)

    def _push(self, pcm: np.ndarray) -> None:
        try:
            self.session.push_audio(pcm)
            self.pushed_samples += len(pcm)
        except RateLimitExceeded:
            self.dropped_samples += len(pcm)  # the session counts the rejection too
