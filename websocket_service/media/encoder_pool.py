"""H.264 encoding in a small pool of worker processes, outside the server process.

In-process encoders run on the media threads (:mod:`.threads`); PyAV (16 and later) releases
the GIL while libx264 encodes, but the Python around each call still takes it. Here each
slot is a one-process ``concurrent.futures.ProcessPoolExecutor`` hosting many encoders
(:mod:`.encoder_worker`); a session's encoder stays in one slot (least-loaded at open). The
parent converts RGB to I420 with OpenCV (releases the GIL; an I420 picture is copied)
straight into the encoder's shared-memory slot and submits a small call; its future is
awaited on the event loop (``asyncio.wrap_future``).

Bounds: one frame in flight per encoder (``encode`` waits for the previous one), and at most
``MAX_PENDING`` calls per slot. If a worker dies, the executor breaks (``BrokenProcessPool``):
the calls in flight raise :class:`ProcessingError`, the slot gets a new executor on next use
(after a back-off that doubles while workers keep dying within ``HEALTHY_S`` of their start,
up to ``MAX_BACKOFF_S``), and each affected encoder is re-created on its next frame, which
is then a keyframe. Workers start with ``forkserver``: the server has threads, so plain fork
is unsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from ..errors import ProcessingError
from . import encoder_worker as worker
from . import threads as media_threads
from .encoder import EncodedFrame, H264Encoder, check_size
from .picture import to_i420

log = logging.getLogger(__name__)
MAX_PENDING = 256
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 30.0
HEALTHY_S = 60.0  # a worker that served this long before dying starts the back-off again
_ids = itertools.count(1)


class _Slot:
    """One worker process (a one-process executor) and the encoders it hosts."""

    def __init__(self, index: int, ctx: Any) -> None:
        self.index = index
        self._ctx = ctx
        self.generation = 0  # +1 per executor: an encoder opened on an older one is re-created
        self.encoders = 0  # open handles assigned here (for least-loaded assignment)
        self.pid: int | None = None  # the worker's, once it answered
        self.pending = 0
        self._executor: ProcessPoolExecutor | None = None
        self._deaths = 0  # in a row, for the back-off
        self._retry_at = 0.0
        self._started = 0.0

    @property
    def running(self) -> bool:
        return self._executor is not None

    async def ready(self) -> None:
        """A live executor (a new one after a death, once the back-off has passed)."""
        if self._executor is not None:
            return
        await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
        if self._executor is None:
            self._executor = ProcessPoolExecutor(1, mp_context=self._ctx,
                                                 initializer=worker.init_worker)
            self.generation += 1
            self._started = time.monotonic()

    async def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the worker process."""
        executor = self._executor
        if executor is None:
            raise ProcessingError("encoder process is gone; retry", {"worker": self.index})
        if self.pending >= MAX_PENDING:
            raise ProcessingError("encoder worker queue is full", {"worker": self.index})
        generation = self.generation
        self.pending += 1
        try:
            result = await asyncio.wrap_future(executor.submit(fn, *args))
        except BrokenProcessPool:
            self._broken(generation)
            raise ProcessingError("encoder process died; the stream restarts at the next "
                                  "keyframe", {"worker": self.index}) from None
        except RuntimeError as exc:  # submit after shutdown: the pool is closing
            raise ProcessingError("the encoder pool is closed", {"worker": self.index}) from exc
        finally:
            self.pending -= 1
        return result

    def _broken(self, generation: int) -> None:
        if generation != self.generation or self._executor is None:
            return  # already replaced
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self.pid = None
        now = time.monotonic()
        if now - self._started > HEALTHY_S:
            self._deaths = 0  # it had served a while: not a crash loop
        self._deaths += 1
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self._deaths - 1))
        self._retry_at = now + backoff
        log.error("encoder process %d died (%d in a row); a new one starts in %.2f s",
                  self.index, self._deaths, backoff)

    def stop(self) -> None:
        """End the process (waits for a call still running, which takes milliseconds)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self.pid = None


class EncoderPool:
    """``processes`` worker processes hosting the H.264 encoders of all sessions."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or os.cpu_count() or 1
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([worker.__name__])  # av, cv2 imported once
        self._slots = [_Slot(i, ctx) for i in range(self.processes)]
        self._handles: set[PoolEncoder] = set()

    async def start(self) -> None:
        """Start the workers (``open`` does it on first use; the app does it at start-up):
        each answers one call, so the forkserver's imports are done before the first frame."""
        for slot in self._slots:
            await slot.ready()
        for slot in self._slots:
            slot.pid = await slot.call(os.getpid)

    def slots(self) -> list[_Slot]:
        return list(self._slots)

    async def open(self, width: int, height: int, fps: int = 25, bitrate: int = 1_000_000,
                   gop_frames: int = 25) -> PoolEncoder:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError("H.264 4:2:0 needs even width and height")
        slot = min(self._slots, key=lambda w: w.encoders)
        handle = PoolEncoder(self, slot, (width, height, fps, bitrate, gop_frames))
        slot.encoders += 1
        self._handles.add(handle)
        try:
            await handle._open()
        except BaseException:
            await handle.close()
            raise
        return handle

    async def aclose(self) -> None:
        for handle in list(self._handles):
            await handle.close()
        for slot in self._slots:
            await asyncio.to_thread(slot.stop)


class PoolEncoder:
    """One session's encoder inside a pool worker; same results as :class:`H264Encoder`."""

    def __init__(self, pool: EncoderPool, slot: _Slot, params: tuple[int, ...]) -> None:
        self._pool, self._slot, self._params = pool, slot, params
        self.width, self.height = params[0], params[1]
        self.id = next(_ids)
        self._shm: SharedMemory | None = SharedMemory(create=True, size=self.width * self.height * 3 // 2)
        self._yuv = np.ndarray((self.height * 3 // 2, self.width), np.uint8, self._shm.buf)
        self._generation = -1  # the slot's executor this encoder lives in
        self._pts = 0
        self._force_key = False
        self._inflight: asyncio.Future[Any] | None = None

    async def _open(self) -> None:
        slot = self._slot
        await slot.ready()
        generation = slot.generation
        assert self._shm is not None
        slot.pid = await slot.call(worker.open_encoder, self.id, *self._params, self._shm.name,
                                   self._pts)
        self._generation = generation

    def request_keyframe(self) -> None:
        self._force_key = True

    async def _settle(self) -> None:
        # a cancelled caller leaves its call running in the worker, which reads the slot
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._inflight)

    async def encode(self, image: np.ndarray) -> EncodedFrame:
        """One RGB or I420 picture (:mod:`.picture`)."""
        check_size(image, self.width, self.height)
        if self._shm is None:
            raise ProcessingError("encoder is closed")
        await self._settle()
        if self._generation != self._slot.generation or not self._slot.running:
            await self._open()  # a new worker: re-create, starting with a keyframe
        to_i420(image, dst=self._yuv)
        self._inflight = asyncio.ensure_future(
            self._slot.call(worker.encode, self.id, self._force_key))
        self._force_key = False
        data, key, pts = await asyncio.shield(self._inflight)
        self._pts = pts + 1
        return EncodedFrame(data, key, pts)

    async def encode_many(self, images: list[np.ndarray]) -> list[EncodedFrame]:
        """Each image in order (one worker call each: the slot holds one frame at a time)."""
        return [await self.encode(image) for image in images]

    async def close(self) -> None:
        if self._shm is None:
            return
        await self._settle()
        self._inflight = None
        slot = self._slot
        slot.encoders -= 1
        if slot.running and self._generation == slot.generation:
            with contextlib.suppress(ProcessingError):
                await slot.call(worker.close_encoder, self.id)
        del self._yuv
        self._shm.close()
        self._shm.unlink()
        self._shm = None
        self._pool._handles.discard(self)  # last: a handle listed still owns its memory


class InProcessEncoder:
    """The same async API over an in-process :class:`H264Encoder` (``encoder_processes=0``).

    Encodes run on a media thread (:mod:`.threads`), one call at a time. A caller cancelled
    mid-encode leaves its encode running in that thread, so :meth:`close` waits for it before
    freeing the x264 context (about 4 MB at 512x512): freeing it under a running encode would
    crash.
    """

    def __init__(self, encoder: H264Encoder) -> None:
        self._enc: H264Encoder | None = encoder
        self._inflight: Future[Any] | None = None  # the media-thread call, not its waiter

    def request_keyframe(self) -> None:
        if self._enc is not None:
            self._enc.request_keyframe()

    async def _settle(self) -> None:
        """Until the last call has ended in its thread (its waiter may have been cancelled)."""
        while self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):  # outcome: a cancelled wait leaves the call
                await media_threads.outcome(self._inflight)
        self._inflight = None

    async def encode(self, image: np.ndarray) -> EncodedFrame:
        return (await self.encode_many([image]))[0]

    async def encode_many(self, images: list[np.ndarray]) -> list[EncodedFrame]:
        """Each image in order, in one media-thread call (one hop for a feed catching up)."""
        await self._settle()
        if self._enc is None:
            raise ProcessingError("encoder is closed")
        enc = self._enc
        self._inflight = media_threads.submit(lambda: [enc.encode(image) for image in images])
        return await media_threads.outcome(self._inflight)

    async def close(self) -> None:
        """Wait for an encode still running, then free the context now (not at the next GC)."""
        await self._settle()
        if self._enc is not None:
            self._enc.close()
            self._enc = None


async def open_encoder(pool: EncoderPool | None, width: int, height: int, fps: int, bitrate: int,
                       gop_frames: int) -> PoolEncoder | InProcessEncoder:
    """An encoder in ``pool``, or in this process when there is no pool."""
    if pool is None:
        # on a media thread: opening the encoder takes milliseconds, not for the event loop
        return InProcessEncoder(await media_threads.run(H264Encoder, width, height, fps,
                                                        bitrate, gop_frames))
    return await pool.open(width, height, fps, bitrate, gop_frames)
