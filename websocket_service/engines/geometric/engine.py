"""Weight-free lip-sync (first cut: loudness opens a mouth-region stretch).

Placeholder quality: the mouth geometry, audio analysis and rendering are being rewritten
under the weight-free engine issue. The interface and streaming behaviour are final.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from ...avatars.model import Avatar, BaseFrame
from ...config import Settings
from ..audio_buffer import UtteranceBuffer
from ..base import LipSyncEngine, LipSyncStream, ProgressFn, SpeechFrame


class GeometricStream(LipSyncStream):
    def __init__(self, engine: GeometricEngine, avatar: Avatar) -> None:
        self.engine = engine
        self.avatar = avatar
        self.buf = UtteranceBuffer(engine.lookahead_frames)
        self._epoch = 0
        self._ready = asyncio.Event()
        self._open = 0.0

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
        self._open = 0.0
        self._ready.set()  # wake a waiting render_next so it returns []

    def buffered_samples(self) -> int:
        return self.buf.buffered_samples()

    def ready_frames(self) -> int:
        return self.buf.ready()

    async def render_next(self, take_base: Callable[[], BaseFrame], max_frames: int) -> list[SpeechFrame]:
        epoch = self._epoch
        while not self.buf.ready():
            self._ready.clear()
            await self._ready.wait()
            if epoch != self._epoch:
                return []
        slots = self.buf.take(max_frames)
        jobs = []
        for s in slots:
            ctx = self.buf.window(s.utterance_id, s.index * 640, (s.index + 2) * 640)
            rms = float(np.sqrt(np.mean(ctx.astype(np.float32) ** 2))) / 32768.0
            target = min(1.0, rms * 8.0)
            self._open += (target - self._open) * (0.6 if target > self._open else 0.5)
            jobs.append((s, take_base(), self._open))
        frames = await asyncio.to_thread(self._render_all, jobs)
        return [] if epoch != self._epoch else frames

    def _render_all(self, jobs: list) -> list[SpeechFrame]:
        return [SpeechFrame(s.utterance_id, s.index, self.engine.render(b, o), s.pcm, s.last, b,
                            {"open": o}, s.arrival) for s, b, o in jobs]


class GeometricEngine(LipSyncEngine):
    name = "geometric"
    lookahead_frames = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "loaded": True, "device": "cpu", "lookahead_ms": 40}

    def prepare_avatar(self, avatar: Avatar, progress: ProgressFn | None = None) -> None:
        face = avatar.meta.get("face_box") or [0, 0, avatar.width, avatar.height]
        x, y, w, h = face
        avatar.engine_data[self.name] = {"mouth": (x + w / 2, y + 0.78 * h, 0.45 * w)}

    def open_stream(self, avatar: Avatar) -> LipSyncStream:
        return GeometricStream(self, avatar)

    def render(self, base: BaseFrame, opening: float) -> np.ndarray:
        img = base.image.copy()
        if opening < 0.02:
            return img
        cx, cy, mw = self._mouth(base)
        axes = (max(2, int(mw * 0.45)), max(1, int(mw * 0.3 * opening)))
        cv2.ellipse(img, (int(cx), int(cy)), axes, 0, 0, 360, (60, 20, 25), -1, cv2.LINE_AA)
        return img

    def _mouth(self, base: BaseFrame) -> tuple[float, float, float]:
        return self._avatar_mouth

    _avatar_mouth = (256.0, 380.0, 80.0)
