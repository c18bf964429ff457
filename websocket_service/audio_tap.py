"""Audio a peer sends into a session (the page's microphone), handed to applications (ASR).

Every piece of a WebRTC peer's audio track, resampled to 16 kHz mono int16, is published here
before the speech gate looks at it, with its position in that stream (ms since its first
sample). Subscribers are plain callbacks, called on the event loop in order; they must not
block (the WebSocket endpoint queues, bounded, and sends from its own task).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from .units import SAMPLE_RATE

Listener = Callable[[int, np.ndarray], None]  # (timestamp_ms, int16 samples)


class AudioTap:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self.samples = 0  # published so far

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(timestamp_ms, pcm)`` for every later piece; returns the unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)
        return unsubscribe

    def publish(self, pcm: np.ndarray) -> None:
        ts = self.samples * 1000 // SAMPLE_RATE
        self.samples += len(pcm)
        for listener in list(self._listeners):
            listener(ts, pcm)

    def close(self) -> None:
        self._listeners.clear()
