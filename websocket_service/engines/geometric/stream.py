"""One session's speech on the geometric engine: audio in, rendered frames out, in order."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np

from ...avatars.model import BaseFrame
from ..audio_buffer import FrameSlot, UtteranceBuffer
from ..base import SAMPLES_PER_FRAME, LipSyncStream, SpeechFrame
from .audio import WINDOW, AudioAnalyzer, Features
from .fields import MouthPose

Job = tuple[FrameSlot, BaseFrame, np.ndarray]  # the slot, its base frame, its analysis window


Render = Callable[[BaseFrame, MouthPose], np.ndarray]


class GeometricStream(LipSyncStream):
    """``render`` draws a pose on a base frame (the engine's, injected: no import cycle)."""

    def __init__(self, render: Render, lookahead_frames: int, clock: Callable[[], float]) -> None:
        self.render = render
        self.buf = UtteranceBuffer(lookahead_frames, clock)
        self.analyzer = AudioAnalyzer()  # used in the worker thread only (see _render_all)
        self._utterance = 0
        self._epoch = 0
        self._analysed_epoch = 0
        self._ready = asyncio.Event()
        self._lock = threading.Lock()  # one batch at a time (the producer awaits each)

    def push_audio(self, pcm: np.ndarray) -> None:
        self.buf.push(pcm)
        if self.buf.ready():
            self._ready.set()

    def end_segment(self) -> None:
        self.buf.end()
        if self.buf.ready():
            self._ready.set()

    def interrupt(self) -> None:
        self.buf.clear()
        self._epoch += 1  # the analyser starts the next batch with a closed mouth
        self._ready.set()  # wake a waiting render_next so it returns []

    def buffered_samples(self) -> int:
        return self.buf.buffered_samples()

    def ready_frames(self) -> int:
        return self.buf.ready()

    async def render_next(self, take_base: Callable[[], BaseFrame],
                          max_frames: int) -> list[SpeechFrame]:
        epoch = self._epoch
        while not self.buf.ready():
            self._ready.clear()
            await self._ready.wait()
            if epoch != self._epoch:
                return []
        jobs = [(s, take_base(), self._window(s)) for s in self.buf.take(max_frames)]
        frames = await asyncio.to_thread(self._render_all, jobs, epoch)
        return [] if epoch != self._epoch else frames

    def _window(self, slot: FrameSlot) -> np.ndarray:
        """The slot's analysis window, copied on the loop (the buffer is the loop's)."""
        start = slot.index * SAMPLES_PER_FRAME - SAMPLES_PER_FRAME // 2
        return self.buf.window(slot.utterance_id, start, start + WINDOW)

    def _analyse(self, slot: FrameSlot, window: np.ndarray, epoch: int
                 ) -> tuple[MouthPose, Features]:
        """The slot's pose: FFT and LPC in the worker thread, off the event loop."""
        if slot.utterance_id != self._utterance or epoch != self._analysed_epoch:
            self._utterance, self._analysed_epoch = slot.utterance_id, epoch
            self.analyzer.reset_mouth()
        return self.analyzer.step(window)

    def _render_all(self, jobs: list[Job], epoch: int) -> list[SpeechFrame]:
        out = []
        with self._lock:
            for slot, base, window in jobs:
                pose, feat = self._analyse(slot, window, epoch)
                image = self.render(base, pose)
                info = {"open": pose.opening, "shape": pose.shape, "level_db": feat.level_db,
                        "voiced": float(feat.voiced)}
                out.append(SpeechFrame(slot.utterance_id, slot.index, image, slot.pcm, slot.last,
                                       base, info, slot.arrival, slot.audio_ms))
        return out
