"""One session's MuseTalk stream: audio in, one window per hop to the inference core, faces
back, blended into the avatar's frames."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ...avatars.model import Avatar, BaseFrame
from ...errors import ProcessingError
from ...media import threads as media_threads
from ..audio_buffer import FrameSlot, UtteranceBuffer
from ..base import SAMPLES_PER_FRAME, LipSyncStream, SpeechFrame
from .audio import AUDIO_LOOKAHEAD_FRAMES, WHISPER_HOP, fixed_window
from .process import Runner

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

    hop: int  # frames per audio window (per encoder pass)
    window_samples: int  # the one length of every window (audio.fixed_window_samples)
    deadline_s: float  # a frame is due this long after its audio arrived
    runner: Callable[[], Runner | None]  # None once the engine is closed
    on_close: Callable[[], None]  # the engine's open-stream count


class MuseTalkStream(LipSyncStream):
    """One session's speech: audio in, one job per hop (a window + its frames) to the inference
    core, faces back, blended into the avatar frames here."""

    def __init__(self, engine: StreamDeps, avatar: Avatar, data: dict[str, Any],
                 clock: Callable[[], float]) -> None:
        self.engine = engine
        self.avatar = avatar
        self.data = data
        self.session = next(_ids)
        history = engine.window_samples + SAMPLES_PER_FRAME * (MAX_TAKE + 8)
        self.buf = UtteranceBuffer(AUDIO_LOOKAHEAD_FRAMES, clock, history_samples=history)
        self._epoch = 0
        self._ready = asyncio.Event()
        self._closed = False

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
        self._epoch += 1
        self._drop_in_core()
        self._ready.set()  # a waiting render_next returns []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_in_core()
            self.engine.on_close()

    def _drop_in_core(self) -> None:
        runner = self.engine.runner()
        if runner is not None:
            runner.control("drop_session", self.session)  # its frames still queued there

    # -- state
    def buffered_samples(self) -> int:
        return self.buf.buffered_samples()

    def _renderable(self) -> int:
        ready = self.buf.ready()
        # one audio window per hop; an ended utterance's tail goes out at once
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
        slots = self.buf.take(max(1, min(max_frames, MAX_TAKE)))
        bases = [take_base() for _ in slots]
        runner = self.engine.runner()
        if runner is None:
            raise ProcessingError("MuseTalk engine is closed")
        futures = [runner.submit(meta, pcm, len(meta["frames"]))
                   for meta, pcm in self._jobs(slots, bases)]
        try:
            parts = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except ProcessingError:
            if epoch != self._epoch:  # the core dropped them for the interrupt
                return []
            raise
        if epoch != self._epoch:
            return []
        faces = np.concatenate(parts)
        images = await media_threads.run(self._blend_all, bases, faces,
                                         priority=media_threads.RENDER)
        if epoch != self._epoch:
            return []
        return [SpeechFrame(s.utterance_id, s.index, img, s.pcm, s.last, b, {}, s.arrival,
                            s.audio_ms)
                for s, b, img in zip(slots, bases, images, strict=True)]

    def _jobs(self, slots: list[FrameSlot], bases: list[BaseFrame]
              ) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Per hop of frames of one utterance: (meta, its fixed-length PCM window)."""
        jobs = []
        hop, length = self.engine.hop, self.engine.window_samples
        pairs = list(zip(slots, bases, strict=True))
        for uid, group in itertools.groupby(pairs, key=lambda p: p[0].utterance_id):
            items = list(group)
            received, ended = self.buf.received(uid)
            for i in range(0, len(items), hop):
                part = items[i: i + hop]
                start, end = fixed_window(part[-1][0].index, received, ended, length)
                frames = [[s.index, b.clip, b.index, s.arrival + self.engine.deadline_s]
                          for s, b in part]
                meta = {"session": self.session, "avatar": self.data["key"],
                        "offset": start // WHISPER_HOP,
                        "n_valid": -(-received // WHISPER_HOP) if ended else None,
                        "frames": frames}
                jobs.append((meta, self.buf.window(uid, start, end)))
        return jobs

    def _blend_all(self, bases: list[BaseFrame], faces: np.ndarray) -> list[np.ndarray]:
        clips = self.data["clips"]
        return [blend(b.image, face, clips[b.clip].boxes[b.index], clips[b.clip].masks[b.index])
                for b, face in zip(bases, faces, strict=True)]
