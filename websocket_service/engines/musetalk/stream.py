"""One session's MuseTalk stream: audio in, features once per hop, frames through the worker."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from ...avatars.model import Avatar, BaseFrame
from ...errors import ProcessingError
from ..audio_buffer import FrameSlot, UtteranceBuffer
from ..base import SAMPLES_PER_FRAME, LipSyncStream, SpeechFrame
from .audio import AUDIO_LOOKAHEAD_FRAMES, WHISPER_HOP, window_bounds
from .worker import InferenceWorker, Request

MAX_TAKE = 32  # slots per encoder pass (bounds the audio history the buffer keeps)
_ids = itertools.count(1)


def blend(image: np.ndarray, face: np.ndarray, box: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``face`` resized into ``box`` and alpha-composited with ``mask``; exact where mask is 0."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = image.copy()
    shrink = (x2 - x1) < face.shape[1]
    face = cv2.resize(face, (x2 - x1, y2 - y1),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    a = mask.astype(np.uint16)[..., None]
    region = out[y1:y2, x1:x2].astype(np.uint16)
    out[y1:y2, x1:x2] = ((region * (255 - a) + face.astype(np.uint16) * a + 127) // 255
                         ).astype(np.uint8)
    return out


@dataclass(frozen=True)
class StreamDeps:
    """What a stream needs from the engine (injected, so this module never imports it)."""

    hop: int  # frames per audio-encoder pass
    context_samples: int  # left audio context of each pass
    max_window_samples: int
    batch_max: int
    features: Callable[[list[tuple]], list[torch.Tensor]]  # audio windows -> frame tokens
    worker: Callable[[], InferenceWorker | None]  # None once the engine is closed


class MuseTalkStream(LipSyncStream):
    def __init__(self, engine: StreamDeps, avatar: Avatar, data: dict[str, Any],
                 clock: Callable[[], float]) -> None:
        self.engine = engine
        self.avatar = avatar
        self.data = data
        self.session = next(_ids)
        history = engine.context_samples + SAMPLES_PER_FRAME * (MAX_TAKE + 8)
        self.buf = UtteranceBuffer(AUDIO_LOOKAHEAD_FRAMES, clock, history_samples=history)
        self._pending: deque[tuple[FrameSlot, torch.Tensor]] = deque()
        self._epoch = 0
        self._ready = asyncio.Event()

    # -- input
    def push_audio(self, pcm: np.ndarray) -> None:
        self.buf.push(pcm)
        if self._renderable():
            self._ready.set()

    def end_segment(self) -> None:
        self.buf.end()
        if self._renderable():
            self._ready.set()

    def interrupt(self) -> None:
        self.buf.clear()
        self._pending.clear()
        self._epoch += 1
        self._ready.set()  # a waiting render_next returns []

    # -- state
    def buffered_samples(self) -> int:
        return self.buf.buffered_samples() + SAMPLES_PER_FRAME * len(self._pending)

    def _renderable(self) -> int:
        if self._pending:
            return len(self._pending)
        ready = self.buf.ready()
        # one encoder pass per hop; an ended utterance's tail goes out at once
        return ready if ready >= self.engine.hop or self.buf.ready_final() else 0

    def ready_frames(self) -> int:
        return self._renderable()

    # -- output
    async def render_next(self, take_base: Callable[[], BaseFrame], max_frames: int
                          ) -> list[SpeechFrame]:
        epoch = self._epoch
        while not self._renderable():
            self._ready.clear()
            await self._ready.wait()
            if epoch != self._epoch:
                return []
        if not self._pending:
            slots = self.buf.take(MAX_TAKE)
            jobs = self._feature_jobs(slots)
            tokens = await asyncio.to_thread(self.engine.features, jobs)
            if epoch != self._epoch:
                return []
            self._pending.extend(zip(slots, tokens, strict=True))
        picked = [self._pending.popleft() for _ in range(min(max_frames, len(self._pending)))]
        bases = [take_base() for _ in picked]
        faces = await self._generate(bases, [t for _, t in picked])
        if epoch != self._epoch:
            return []
        images = await asyncio.to_thread(self._blend_all, bases, faces)
        if epoch != self._epoch:
            return []
        return [SpeechFrame(s.utterance_id, s.index, img, s.pcm, s.last, b, {}, s.arrival,
                            s.audio_ms)
                for (s, _), b, img in zip(picked, bases, images, strict=True)]

    def _feature_jobs(self, slots: list[FrameSlot]) -> list[tuple]:
        """Per utterance: (pcm window, first encoder frame, valid frames or None, frame indices)."""
        jobs = []
        for uid, group in itertools.groupby(slots, key=lambda s: s.utterance_id):
            idx = [s.index for s in group]
            received, ended = self.buf.received(uid)
            start, end = window_bounds(idx[0], idx[-1], received, ended,
                                       self.engine.context_samples, self.engine.max_window_samples)
            n_valid = -(-received // WHISPER_HOP) if ended else None
            jobs.append((self.buf.window(uid, start, end), start // WHISPER_HOP, n_valid, idx))
        return jobs

    async def _generate(self, bases: list[BaseFrame], tokens: list[torch.Tensor]) -> np.ndarray:
        latents = self.data["latents_dev"]
        lat = torch.stack([latents[b.clip][b.index] for b in bases])
        audio = torch.stack(tokens)
        step = self.engine.batch_max
        worker = self.engine.worker()
        if worker is None:
            raise ProcessingError("MuseTalk engine is closed")
        futures = [worker.submit(Request(self.session, lat[i: i + step], audio[i: i + step]))
                   for i in range(0, len(bases), step)]
        parts = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return np.concatenate(parts)

    def _blend_all(self, bases: list[BaseFrame], faces: np.ndarray) -> list[np.ndarray]:
        clips = self.data["clips"]
        return [blend(b.image, face, clips[b.clip].boxes[b.index], clips[b.clip].masks[b.index])
                for b, face in zip(bases, faces, strict=True)]
