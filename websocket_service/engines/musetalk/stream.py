"""One session's MuseTalk stream: audio in, one window per hop to the inference core, faces
back, blended into the avatar's frames."""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import cv2
import numpy as np

from ...avatars.model import Avatar, BaseFrame
from ...errors import ProcessingError
from ...media import threads as media_threads
from ...media.picture import planes, to_i420
from ..audio_buffer import FrameSlot, UtteranceBuffer
from ..base import SAMPLES_PER_FRAME, LipSyncStream, SpeechFrame
from .audio import AUDIO_LOOKAHEAD_FRAMES, WHISPER_HOP, fixed_window
from .process import Runner

MAX_TAKE = 32  # bounds the audio history the buffer keeps
MAX_AHEAD = 16  # frames a stream has with the core at a time
_ids = itertools.count(1)


@dataclass
class _Job:
    """Frames sent to the core together: their slots, the base frames they are drawn on, the
    future of their faces and then of their blend (started as soon as the faces are back)."""

    slots: list[FrameSlot]
    bases: list[BaseFrame]
    future: Future
    epoch: int  # the stream's epoch when sent: an interrupt since makes its faces unwanted
    blend: Future | None = None  # of the blended images


def mask_rect(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Rows [r0, r1) and columns [c0, c1) of ``mask``'s nonzero pixels; None if it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def blend(image: np.ndarray, face: np.ndarray, box: np.ndarray, mask: np.ndarray,
          rect: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """``face`` resized into ``box`` and alpha-composited with ``mask``; exact where mask is 0.

    Only the mask's bounding rectangle is touched (the lower half of the crop: the upper face
    and everything around are the base image's bytes), and the composite is OpenCV's
    ``blendLinear`` with the mask as weights (exact at weights 0 and 1). The face is resized
    bilinearly, as upstream does: 0.5 ms a frame at 512x512 against 3.5 ms for a uint16
    composite of the whole box after an area resize, which made blending cost more than H.264.
    """
    out = image.copy()
    if rect is None:
        rect = mask_rect(mask)
    if rect is not None:
        x1, y1 = int(box[0]), int(box[1])
        r0, r1, c0, c1 = rect
        _composite(out[y1 + r0: y1 + r1, x1 + c0: x1 + c1], face, box, mask, rect)
    return out


def _composite(region: np.ndarray, face: np.ndarray, box: np.ndarray, mask: np.ndarray,
               rect: tuple[int, int, int, int]) -> None:
    """``face`` resized into ``box``, composited over ``region`` (the mask's ``rect`` of the
    picture) with the mask's weights, in place."""
    x1, y1, x2, y2 = (int(v) for v in box)
    r0, r1, c0, c1 = rect
    face = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    weight = mask[r0:r1, c0:c1].astype(np.float32) * (1 / 255)
    region[:] = cv2.blendLinear(face[r0:r1, c0:c1], region, weight, 1 - weight)


def blend_i420(base: np.ndarray, image: np.ndarray, face: np.ndarray, box: np.ndarray,
               mask: np.ndarray, rect: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """:func:`blend`'s picture as I420 (:mod:`...media.picture`), byte for byte, without
    converting the whole frame: ``base`` is ``image`` as I420.

    Only the mask's rectangle changes. It is widened to even rows and columns (a chroma sample
    covers 2x2 pixels), composited there in RGB as :func:`blend` does, converted, and its
    planes written over ``base``'s copy: ~0.1 ms less a 512x512 frame than ``blend`` and a
    conversion of the whole frame (BENCHMARKS section 4).
    """
    out = base.copy()
    if rect is None:
        rect = mask_rect(mask)
    if rect is None:
        return out
    x1, y1 = int(box[0]), int(box[1])
    r0, r1, c0, c1 = rect
    fy0, fy1, fx0, fx1 = y1 + r0, y1 + r1, x1 + c0, x1 + c1  # the rectangle in the frame
    ey0, ey1, ex0, ex1 = fy0 & ~1, (fy1 + 1) & ~1, fx0 & ~1, (fx1 + 1) & ~1  # widened to even
    patch = np.ascontiguousarray(image[ey0:ey1, ex0:ex1])
    _composite(patch[fy0 - ey0:fy1 - ey0, fx0 - ex0:fx1 - ex0], face, box, mask, rect)
    src = cv2.cvtColor(patch, cv2.COLOR_RGB2YUV_I420)
    for k, (dst, part) in enumerate(zip(planes(out), planes(src), strict=True)):
        s = 1 if k == 0 else 2  # a chroma sample per 2x2 pixels
        dst[ey0 // s:ey1 // s, ex0 // s:ex1 // s] = part
    return out


class BaseI420:
    """I420 copies of an avatar's base frames for :func:`blend_i420`, made on a frame's first
    use and kept while they fit in ``budget`` bytes. Past it, and for a crossfaded action frame
    (not the avatar's own picture), :meth:`get` gives None: the frame is then blended in RGB
    and converted whole, as converting the base and then the blend's rectangle costs more
    (``bench/bench_blend.py``). Shared by the avatar's streams; called from the media threads."""

    BUDGET = 256 << 20  # 680 frames at 512x512; the avatar's RGB frames take twice as much

    def __init__(self, avatar: Avatar, budget: int = BUDGET) -> None:
        self.avatar = avatar
        self.budget = budget
        self._frames: dict[tuple[str, int], np.ndarray] = {}
        self._used = 0
        self._lock = threading.Lock()

    def get(self, b: BaseFrame) -> np.ndarray | None:
        """``b.image`` as I420, kept; None when it is not kept (see above)."""
        if not self._own(b):
            return None
        key = (b.clip, b.index)
        yuv = self._frames.get(key)
        if yuv is None:
            size = b.image.shape[0] * b.image.shape[1] * 3 // 2
            with self._lock:
                if key not in self._frames:
                    if self._used + size > self.budget:
                        return None
                    self._used += size
                    self._frames[key] = cv2.cvtColor(b.image, cv2.COLOR_RGB2YUV_I420)
                yuv = self._frames[key]
        return yuv

    def _own(self, b: BaseFrame) -> bool:
        """Whether ``b.image`` is the avatar's frame ``b.index`` of ``b.clip`` itself."""
        frames = self.avatar.clip(b.clip).frames
        return (b.image.shape == frames.shape[1:] and b.image.ctypes.data
                == frames.ctypes.data + b.index * frames.strides[0]
                and b.image.strides == frames.strides[1:])

    @property
    def used(self) -> int:
        return self._used


class ReadyLatency:
    """How long after their audio arrived frames come out of the engine, over every stream
    (the inference core's batch cycle is shared): its recent p95, plus a margin, is how long an
    utterance waits before it starts playing, so that frames coming in bursts keep their slots
    instead of repeating a picture (an underrun) and pushing the rest of the utterance back."""

    # over the p95: 16 speaking stand-in sessions on 2 cores, decoding in chunks of 8 (6 runs,
    # docs/BENCHMARKS.md section 4): 20 ms kept the underruns at 0.5-1.3 % where 10 ms let
    # 1.1-4.3 % through, for about the same p95 (each underrun pushes the rest of an
    # utterance back a frame, so fewer underruns also take latency off)
    MARGIN_S = 0.02
    MAX_S = 0.5

    MIN_SAMPLES = 20  # fewer: too few to say (no delay)

    #: frames the p95 is over: 5 s at 16 speaking sessions (a minute at one). Over 400 (1 s)
    #: the allowance swung with every burst of load, and since the schedule follows it, so
    #: did each session's latency: its p95 stood ~40 ms over its median, against ~20 with
    #: 2000 (16 stand-in sessions, docs/BENCHMARKS.md section 4)
    WINDOW = 2000

    def __init__(self, window: int = WINDOW) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        # new samples before the p95 is computed again (it is asked every tick, on the event
        # loop): each 2 % of the window, so a longer window costs no more (~0.1 ms a p95 over
        # 2000; every 8 samples that was ~5 ms a second at 16 sessions)
        self._every = max(1, window // 50)
        self._new = 0
        self._delay = 0.0

    def observe(self, seconds: list[float]) -> None:
        self._recent.extend(seconds)
        self._new += len(seconds)

    def delay(self) -> float:
        if self._new >= self._every and len(self._recent) >= self.MIN_SAMPLES:
            p95 = float(np.percentile(np.fromiter(self._recent, float), 95))
            self._delay = min(self.MAX_S, max(0.0, p95 + self.MARGIN_S))
            self._new = 0
        return self._delay


@dataclass(frozen=True)
class StreamDeps:
    """What a stream needs from the engine (injected, so this module never imports it)."""

    hop: int  # frames per audio window (per encoder pass)
    window_samples: int  # the one length of every window (audio.fixed_window_samples)
    deadline_s: float  # a frame is due this long after its audio arrived
    runner: Callable[[], Runner | None]  # None once the engine is closed
    on_close: Callable[[], None]  # the engine's open-stream count
    ready: ReadyLatency  # shared by the engine's streams


class MuseTalkStream(LipSyncStream):
    """One session's speech: audio in, one job per hop (a window + its frames) to the inference
    core, faces back, blended into the avatar frames here.

    A job goes to the core as soon as its audio is there (on ``push_audio``), not when the
    producer next asks: with one render in flight at a time, audio that came during a round
    trip would wait for it, a second round trip of latency. At most ``MAX_AHEAD`` frames are
    in flight; the producer still takes them in order, one job (or the jobs already back) per
    ``render_next``.
    """

    def __init__(self, engine: StreamDeps, avatar: Avatar, data: dict[str, Any],
                 clock: Callable[[], float]) -> None:
        self.engine = engine
        self.avatar = avatar
        self.data = data
        self.session = next(_ids)
        history = engine.window_samples + SAMPLES_PER_FRAME * (MAX_TAKE + 8)
        self.buf = UtteranceBuffer(AUDIO_LOOKAHEAD_FRAMES, clock, history_samples=history)
        self._clock = clock
        self._epoch = 0
        self._ready = asyncio.Event()
        self._closed = False
        self._take_base: Callable[[], BaseFrame] | None = None  # the producer's, once it asks
        self._inflight: deque[_Job] = deque()
        self._error: BaseException | None = None  # a submit refused while pumping

    # -- input
    def push_audio(self, pcm: np.ndarray) -> None:
        self.buf.push(pcm)
        self._pump()

    def end_segment(self) -> None:
        self.buf.end()
        self._pump()

    def interrupt(self) -> None:
        self.buf.clear()
        self._inflight.clear()  # their faces come back to no one (the core drops the rest)
        self._error = None
        self._epoch += 1
        self._drop_in_core()
        self._ready.set()  # a waiting render_next returns []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inflight.clear()
            self._drop_in_core()
            self.engine.on_close()

    def _drop_in_core(self) -> None:
        runner = self.engine.runner()
        if runner is not None:
            runner.control("drop_session", self.session)  # its frames still queued there

    # -- state
    def buffered_samples(self) -> int:
        return self.buf.buffered_samples() + SAMPLES_PER_FRAME * self._frames_in_flight()

    def _frames_in_flight(self) -> int:
        return sum(len(j.slots) for j in self._inflight)

    def _renderable(self) -> int:
        ready = self.buf.ready()
        # one audio window per hop; an ended utterance's tail goes out at once
        return ready if ready >= self.engine.hop or self.buf.ready_final() else 0

    def ready_frames(self) -> int:
        return self._renderable() + self._frames_in_flight()

    def speech_delay(self) -> float:
        return self.engine.ready.delay()

    # -- to the core
    def _pump(self) -> None:
        """Send every hop whose audio is there (up to MAX_AHEAD frames in flight)."""
        take_base = self._take_base
        if take_base is None or self._closed or self._error is not None:
            if self._renderable():
                self._ready.set()
            return
        runner = self.engine.runner()
        while (n := self._renderable()) and self._frames_in_flight() < MAX_AHEAD:
            slots = self.buf.take(min(n, self.engine.hop, MAX_AHEAD - self._frames_in_flight()))
            bases = [take_base() for _ in slots]
            try:
                if runner is None:
                    raise ProcessingError("MuseTalk engine is closed")
                for meta, pcm, part_slots, part_bases in self._jobs(slots, bases):
                    job = _Job(part_slots, part_bases, runner.submit(meta, pcm, len(part_slots)),
                               self._epoch)
                    self._inflight.append(job)
                    # a weak reference: the future keeps its callbacks for good, and a job it
                    # held would hold the future back (a cycle), and with them the job's faces
                    # and blended images until the next full collection (~1 GB at 16 sessions)
                    job.future.add_done_callback(partial(self._faces_back, weakref.ref(job)))
            except Exception as exc:  # noqa: BLE001 - reported by the next render_next
                self._error = exc
                break
        self._ready.set()

    def _faces_back(self, ref: weakref.ref[_Job], future: Future) -> None:
        """On the runner's thread as the faces come back: their blend goes to the media threads
        at once, not when the producer next asks (it may be waiting on an earlier blend), due
        when its first frame's audio was there (see media.threads). Faces that an interrupt
        or close made unwanted (or dropped: ``ref`` is dead) are not blended."""
        job = ref()
        if job is None or job.epoch != self._epoch or self._closed:
            return
        if not future.cancelled() and future.exception() is None:
            job.blend = media_threads.submit(self._blend_all, job.bases, future.result(),
                                             due=job.slots[0].arrival)

    # -- output
    async def render_next(self, take_base: Callable[[], BaseFrame], max_frames: int
                          ) -> list[SpeechFrame]:
        epoch = self._epoch
        self._take_base = take_base
        self._pump()
        while not self._inflight and self._error is None:
            self._ready.clear()
            await self._ready.wait()
            if epoch != self._epoch:
                return []
        if not self._inflight:
            error, self._error = self._error, None
            assert error is not None
            raise error
        first = self._inflight[0]
        try:
            await asyncio.wrap_future(first.future)
        except ProcessingError:
            if epoch != self._epoch:  # the core dropped it for the interrupt
                return []
            self._inflight.popleft()
            raise
        if epoch != self._epoch:
            return []
        jobs = [self._inflight.popleft()]  # and any after it already blended, while they fit
        while (self._inflight and (b := self._inflight[0].blend) is not None and b.done()
               and sum(len(j.slots) for j in jobs) + len(self._inflight[0].slots) <= max_frames):
            jobs.append(self._inflight.popleft())
        self._pump()
        if first.blend is None:  # the media threads refused it (shut down)
            raise ProcessingError("cannot blend MuseTalk faces: the media threads are down")
        await asyncio.wrap_future(first.blend)
        if epoch != self._epoch:
            return []
        out: list[SpeechFrame] = []
        for j in jobs:
            assert j.blend is not None
            out += [SpeechFrame(s.utterance_id, s.index, img, s.pcm, s.last, b, {}, s.arrival,
                                s.audio_ms)
                    for s, b, img in zip(j.slots, j.bases, j.blend.result(), strict=True)]
        # ready for the playout now (the blend's own end is earlier by the hop back to the
        # event loop, which under load is what the allowance must cover too)
        done = self._clock()
        self.engine.ready.observe([done - f.audio_arrival for f in out
                                   if f.audio_arrival is not None])
        return out

    def _jobs(self, slots: list[FrameSlot], bases: list[BaseFrame]
              ) -> list[tuple[dict[str, Any], np.ndarray, list[FrameSlot], list[BaseFrame]]]:
        """Per hop of frames of one utterance: (meta, its fixed-length PCM window, the hop's
        slots, their base frames)."""
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
                jobs.append((meta, self.buf.window(uid, start, end), [s for s, _ in part],
                             [b for _, b in part]))
        return jobs

    def _blend_all(self, bases: list[BaseFrame], faces: np.ndarray) -> list[np.ndarray]:
        """On a media thread: a job's faces (n x 256 x 256 x 3) into their base frames, as I420
        pictures (RGB when the avatar's size is odd: I420 has none)."""
        clips = self.data["clips"]
        rects = self.data.setdefault("mask_rects", {})  # per avatar: (clip, index) -> rect
        i420 = self.data.get("i420")
        out = []
        for b, face in zip(bases, faces, strict=True):
            mask = clips[b.clip].masks[b.index]
            key = (b.clip, b.index)
            if key not in rects:
                rects[key] = mask_rect(mask)
            box = clips[b.clip].boxes[b.index]
            if i420 is None:  # an odd size
                out.append(blend(b.image, face, box, mask, rects[key]))
            elif (base := i420.get(b)) is not None:
                out.append(blend_i420(base, b.image, face, box, mask, rects[key]))
            else:  # past the budget, or a crossfade
                out.append(to_i420(blend(b.image, face, box, mask, rects[key])))
        return out
