"""One session's speech on the geometric engine: audio in, rendered frames out, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from ...avatars.model import BaseFrame
from ...media import threads as media_threads
from ..audio_buffer import FrameSlot, UtteranceBuffer
from ..base import SAMPLES_PER_FRAME, LipSyncStream, SpeechFrame
from .audio import WINDOW, AudioAnalyzer, Features
from .fields import MouthPose

Job = tuple[FrameSlot, BaseFrame, MouthPose, Features]


Render = Callable[[BaseFrame, MouthPose], np.ndarray]


class GeometricStream(LipSyncStream):
    """``render`` draws a pose on a base frame (the engine's, injected: no import cycle)."""

    def __init__(self, render: Render, lookahead_frames: int, clock: Callable[[], float]) -> None:
        self.render = render
        self.buf = UtteranceBuffer(lookahead_frames, clock)
        self.analyzer = AudioAnalyzer()
        self._utterance = 0
        self._epoch = 0
        self._ready = asyncio.Event()

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
        self._epoch += 1
        self.analyzer.reset_mouth()
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
        jobs = [(s, take_base(), *self._analyse(s)) for s in self.buf.take(max_frames)]
        # due when the first frame's audio was there: this engine adds no jitter allowance
        frames = await media_threads.run(self._render_all, jobs,
                                         due=min(s.arrival for s, *_ in jobs))
        return [] if epoch != self._epoch else frames

    def _analyse(self, slot: FrameSlot) -> tuple[MouthPose, Features]:
        """The slot's pose (cheap: one FFT), on the loop while its audio is still buffered."""
        if slot.utterance_id != self._utterance:
            self._utterance = slot.utterance_id
            self.analyzer.reset_mouth()
        start = slot.index * SAMPLES_PER_FRAME - SAMPLES_PER_FRAME // 2
        return self.analyzer.step(self.buf.window(slot.utterance_id, start, start + WINDOW))

    def _render_all(self, jobs: list[Job]) -> list[SpeechFrame]:
        out = []
        for slot, base, pose, feat in jobs:
            image = self.render(base, pose)
            info = {"open": pose.opening, "shape": pose.shape, "level_db": feat.level_db,
                    "voiced": float(feat.voiced)}
            out.append(SpeechFrame(slot.utterance_id, slot.index, image, slot.pcm, slot.last,
                                   base, info, slot.arrival, slot.audio_ms))
        return out
