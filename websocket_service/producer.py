"""The producer: audio in through the engine stream, rendered speech frames out on a bounded queue.

It waits when the queue is full, so backpressure reaches the stream's audio buffer, which the
session itself limits (``max_buffered_audio_s``). One bad render costs one utterance, never
the session: the failure is reported and the producer goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from .avatars.model import BaseFrame
from .clock import Clock
from .engines.base import LipSyncStream, SpeechFrame
from .errors import ProcessingError, ServiceError
from .stats import SessionStats

log = logging.getLogger(__name__)


class SpeechQueue:
    """Rendered speech frames waiting for their tick; bounded, with an epoch for interrupts."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.frames: deque[SpeechFrame] = deque()
        self.epoch = 0
        #: base frames drawn for speech (:meth:`~.playout.Playout.speech_base`) and not yet
        #: shown (or dropped)
        self.drawn = 0
        self.space = asyncio.Event()
        self.space.set()
        #: set whenever frames are added (the playout's grace wait, Playout.grace)
        self.arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self.frames)

    def extend(self, frames: list[SpeechFrame]) -> None:
        self.frames.extend(frames)
        self.arrived.set()
        if len(self.frames) >= self.cap:
            self.space.clear()

    def popleft(self) -> SpeechFrame:
        self.space.set()
        self.drawn = max(0, self.drawn - 1)
        return self.frames.popleft()

    def flush(self) -> None:
        """Drop everything; renders that started before come back stale and are discarded."""
        self.epoch += 1
        self.frames.clear()
        self.drawn = 0
        self.space.set()


class Producer:
    """Renders speech while there is room on the queue.

    ``take_base`` hands out the base frame each speech frame is drawn on: the playout's
    :meth:`~.playout.Playout.speech_base`, so the playout stays the cursor's one owner.
    """

    def __init__(self, stream: LipSyncStream, queue: SpeechQueue,
                 take_base: Callable[[], BaseFrame], clock: Clock, stats: SessionStats,
                 on_failure: Callable[[ServiceError], None]) -> None:
        self.stream = stream
        self.queue = queue
        self.take_base = take_base
        self.clock = clock
        self.stats = stats
        self.on_failure = on_failure

    async def run(self) -> None:
        q = self.queue
        while True:
            await q.space.wait()
            epoch = q.epoch
            called = self.clock.now()
            try:
                frames = await self.stream.render_next(self.take_base, max(1, q.cap - len(q)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad render must not end the session
                log.exception("rendering failed", exc_info=exc)
                self.stats.render_failed()
                self.on_failure(exc if isinstance(exc, ServiceError)
                                else ProcessingError("rendering failed; speech dropped"))
                continue
            if epoch != q.epoch or not frames:
                continue
            self._account(frames, called)
            q.extend(frames)

    def _account(self, frames: list[SpeechFrame], called: float) -> None:
        """Time from when the frames' audio was there (or the call began) to rendered."""
        arrivals = [f.audio_arrival for f in frames if f.audio_arrival is not None]
        ready = max(called, min(arrivals)) if arrivals else called
        self.stats.render_done(len(frames), self.clock.now() - ready)
