"""The engine interface: audio in, lip-synced frames out.

An engine is created once per process (it owns models and workers); each session opens a
:class:`LipSyncStream` on it. The session owns timing and state; a stream only turns audio
into frames, in order, as soon as each frame's audio (plus the engine's look-ahead) is there.

Audio is 16 kHz mono int16. Frame ``n`` of an utterance covers samples ``[640 n, 640 (n+1))``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..avatars.model import Avatar, BaseFrame
from ..units import SAMPLE_RATE, SAMPLES_PER_FRAME

__all__ = ["SAMPLES_PER_FRAME", "SAMPLE_RATE", "LipSyncEngine", "LipSyncStream", "SpeechFrame"]

ProgressFn = Callable[[float, str], None]


@dataclass
class SpeechFrame:
    """One rendered frame of speech."""

    utterance_id: int
    index: int  # frame n within the utterance
    image: np.ndarray  # RGB (H, W, 3) or I420 (H * 3 / 2, W) uint8: media.picture
    pcm: np.ndarray  # the 640 int16 samples this frame covers (zero-padded at the end)
    last: bool  # the utterance's final frame
    base: BaseFrame | None = None
    info: dict[str, float] = field(default_factory=dict)  # e.g. engine's mouth parameters
    audio_arrival: float | None = None  # monotonic time its last needed audio arrived
    audio_ms: int | None = None  # where its audio starts in all the session's audio so far


class LipSyncStream(ABC):
    """One session's speech. Not thread-safe: call from the event loop only."""

    @abstractmethod
    def push_audio(self, pcm: np.ndarray) -> None:
        """Append int16 mono 16 kHz samples (any length) to the current utterance."""

    @abstractmethod
    def end_segment(self) -> None:
        """The utterance is complete: pad its tail and look-ahead so every frame can render."""

    @abstractmethod
    def interrupt(self) -> None:
        """Drop buffered audio and frames not yet returned; a render in flight returns []."""

    @abstractmethod
    def buffered_samples(self) -> int:
        """Samples received but not yet turned into returned frames (for the audio limit)."""

    @abstractmethod
    def ready_frames(self) -> int:
        """How many frames could be rendered now."""

    @abstractmethod
    async def render_next(
        self, take_base: Callable[[], BaseFrame], max_frames: int
    ) -> list[SpeechFrame]:
        """Wait for at least one ready frame, render up to ``max_frames`` of them in order.

        ``take_base`` is called once per frame, in order, to get the frame to draw on. Heavy
        work must run off the event loop. Returns [] if interrupted while waiting/rendering.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-session resources."""

    def speech_delay(self) -> float:
        """Seconds after a frame's audio arrived that its utterance should start playing, so
        that later frames arrive before their slots (0: as soon as the first is rendered)."""
        return 0.0


class LipSyncEngine(ABC):
    """A lip-sync engine shared by all sessions."""

    name: ClassVar[str]
    #: frames of audio after a frame's own 40 ms slot that it needs before it can render
    lookahead_frames: int = 0

    @abstractmethod
    def load(self) -> None:
        """Load models. Raise errors.ModelNotFound naming any missing file."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Status for /health: at least {'name', 'loaded', 'device'}."""

    @abstractmethod
    def prepare_avatar(self, avatar: Avatar, progress: ProgressFn | None = None) -> None:
        """Compute (or load from ``avatar.path``) this engine's cache into ``avatar.engine_data``.

        Runs in a worker thread. Must be idempotent and cheap when the cache exists on disk.
        """

    @abstractmethod
    def open_stream(self, avatar: Avatar, clock: Callable[[], float] = time.monotonic
                    ) -> LipSyncStream:
        """A new per-session stream on a prepared avatar; ``clock`` is the session's."""

    def stats(self) -> dict[str, Any]:
        """Engine-wide counters for /sessions (e.g. batching); empty by default."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop workers, free memory."""
