"""H.264 encoding in a small pool of worker processes, outside the server's GIL.

PyAV holds the GIL while libx264 encodes, so in-process encoders of all sessions run one at a
time and compete with rendering. Here each worker process hosts many encoders keyed by id; a
session's encoder stays in one worker (least-loaded at open). The parent converts RGB to I420
with OpenCV (releases the GIL) straight into the encoder's shared-memory slot and sends a small
request down the worker's pipe; the reply (Annex B bytes, keyframe flag, pts) resolves a future
on the event loop through ``loop.add_reader`` on the pipe, so nothing polls.

Bounds: one frame in flight per encoder (``encode`` waits for the previous one), so a worker's
pipe holds at most one request per encoder it hosts, and at most ``MAX_PENDING`` in all.
If a worker dies, its pending encodes raise :class:`ProcessingError`, the pool starts a new
worker, and each affected encoder is re-created on its next frame (which is then a keyframe).
Workers start with ``forkserver``: the server has threads, so plain fork is unsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import threading
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import cv2
import numpy as np

from ..errors import ProcessingError
from .encoder import EncodedFrame, H264Encoder
from .encoder_worker import worker_main

log = logging.getLogger(__name__)
MAX_PENDING = 256
_ids = itertools.count(1)


# ---------------------------------------------------------------------------- parent side

def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Worker:
    """One worker process, its pipe and its pending requests.

    A reader thread blocks on the pipe (releasing the GIL) and hands each reply to the event
    loop; ``loop.add_reader`` would need the socket non-blocking, and a large reply can then
    arrive in pieces.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.generation = 0
        self.encoders = 0  # open handles assigned here (for least-loaded assignment)
        self.proc: Any = None
        self.conn: Connection | None = None
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self._reqs = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    def spawn(self, ctx: Any) -> Connection:
        """Start the process (blocking: the first one waits for the forkserver's imports)."""
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child,), daemon=True,
                                name=f"h264-encoder-{self.index}")
        self.proc.start()
        child.close()
        return parent

    def attach(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``conn``: replies resolve futures on ``loop`` (call on the loop's thread)."""
        self.conn, self._loop = conn, loop
        self.generation += 1
        threading.Thread(target=self._read, args=(conn, loop, self.generation), daemon=True,
                         name=f"h264-encoder-{self.index}-reader").start()

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop, generation: int) -> None:
        while True:
            try:
                reply = conn.recv()
            except (EOFError, OSError):
                break
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._resolve, reply)
        conn.close()
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._died, generation)

    def request(self, op: str, eid: int, *args: Any) -> asyncio.Future[Any]:
        if self._loop is None or self.conn is None:
            raise ProcessingError("encoder process is gone; retry", {"worker": self.index})
        if len(self.pending) >= MAX_PENDING:
            raise ProcessingError("encoder worker queue is full", {"worker": self.index})
        req = next(self._reqs)
        fut = self._loop.create_future()
        try:
            self.conn.send((op, req, eid, *args))
        except OSError:
            self._died(self.generation)
            raise ProcessingError("encoder process is gone; retry", {"worker": self.index}) from None
        fut.add_done_callback(_retrieve)  # an abandoned request's error is not worth a warning
        self.pending[req] = fut
        return fut

    def _resolve(self, reply: tuple[int, bool, Any]) -> None:
        req, ok, payload = reply
        fut = self.pending.pop(req, None)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(payload)
        else:
            fut.set_exception(ProcessingError(f"encoding failed: {payload}"))

    def _died(self, generation: int) -> None:
        if generation != self.generation or self.conn is None:
            return  # stopped on purpose, or already replaced
        self.conn = None
        self.proc.join(1.0)
        code = self.proc.exitcode
        log.error("encoder process %d exited (code %s); it restarts on next use", self.index, code)
        err = ProcessingError("encoder process died; the stream restarts at the next keyframe",
                              {"worker": self.index, "exitcode": code})
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()

    def stop(self) -> None:
        """End the process; its reader thread then sees EOF and closes the pipe."""
        self.conn = None
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ProcessingError("the encoder pool is closed"))
        self.pending.clear()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.join(1.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(1.0)


class EncoderPool:
    """``processes`` worker processes hosting the H.264 encoders of all sessions."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or os.cpu_count() or 1
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload([worker_main.__module__])  # av, cv2 imported once
        self._workers = [_Worker(i) for i in range(self.processes)]
        self._started = False
        self._lock = asyncio.Lock()
        self._handles: set[PoolEncoder] = set()

    async def start(self) -> None:
        """Start the workers (``open`` does it on first use; the app does it at start-up)."""
        async with self._lock:
            if not self._started:
                loop = asyncio.get_running_loop()
                for w in self._workers:
                    w.attach(await asyncio.to_thread(w.spawn, self._ctx), loop)
                self._started = True

    async def _alive(self, w: _Worker) -> None:
        async with self._lock:  # several encoders may find the same worker dead
            if w.conn is None:  # died: start a replacement
                w.attach(await asyncio.to_thread(w.spawn, self._ctx), asyncio.get_running_loop())

    async def open(self, width: int, height: int, fps: int = 25, bitrate: int = 1_000_000,
                   gop_frames: int = 25) -> PoolEncoder:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError("H.264 4:2:0 needs even width and height")
        await self.start()
        worker = min(self._workers, key=lambda w: w.encoders)
        handle = PoolEncoder(self, worker, (width, height, fps, bitrate, gop_frames))
        worker.encoders += 1
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
        for w in self._workers:
            w.stop()
        self._started = False
        self._lock = asyncio.Lock()  # a later start may run on another event loop (tests)


class PoolEncoder:
    """One session's encoder inside a pool worker; same results as :class:`H264Encoder`."""

    def __init__(self, pool: EncoderPool, worker: _Worker, params: tuple[int, ...]) -> None:
        self._pool, self._worker, self._params = pool, worker, params
        self.width, self.height = params[0], params[1]
        self.id = next(_ids)
        self._shm: SharedMemory | None = SharedMemory(create=True, size=self.width * self.height * 3 // 2)
        self._yuv = np.ndarray((self.height * 3 // 2, self.width), np.uint8, self._shm.buf)
        self._generation = -1
        self._pts = 0
        self._force_key = False
        self._inflight: asyncio.Future[Any] | None = None

    async def _open(self) -> None:
        await self._pool._alive(self._worker)
        self._generation = self._worker.generation
        assert self._shm is not None
        await self._worker.request("open", self.id, *self._params, self._shm.name, self._pts)

    def request_keyframe(self) -> None:
        self._force_key = True

    async def _settle(self) -> None:
        # a cancelled caller leaves its request running in the worker, which reads the slot
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._inflight)

    async def encode(self, rgb: np.ndarray) -> EncodedFrame:
        if rgb.shape[0] != self.height or rgb.shape[1] != self.width:
            raise ValueError(f"frame is {rgb.shape[1]}x{rgb.shape[0]}, encoder is {self.width}x{self.height}")
        if self._shm is None:
            raise ProcessingError("encoder is closed")
        await self._settle()
        if self._generation != self._worker.generation or self._worker.conn is None:
            await self._open()  # the worker was restarted: re-create, starting with a keyframe
        cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420, dst=self._yuv)
        self._inflight = self._worker.request("enc", self.id, self._force_key)
        self._force_key = False
        data, key, pts = await asyncio.shield(self._inflight)
        self._pts = pts + 1
        return EncodedFrame(data, key, pts)

    async def close(self) -> None:
        if self._shm is None:
            return
        await self._settle()
        self._worker.encoders -= 1
        if self._worker.conn is not None and self._generation == self._worker.generation:
            with contextlib.suppress(ProcessingError):
                self._worker.request("close", self.id)  # the reply needs no waiting for
        del self._yuv
        self._shm.close()
        self._shm.unlink()
        self._shm = None
        self._pool._handles.discard(self)  # last: a handle listed still owns its memory


class InProcessEncoder:
    """The same async API over an in-process :class:`H264Encoder` (``encoder_processes=0``).

    Encodes run in a worker thread, one at a time. A caller cancelled mid-encode leaves its
    encode running in that thread, so :meth:`close` waits for it before freeing the x264
    context (about 4 MB at 512x512): freeing it under a running encode would crash.
    """

    def __init__(self, encoder: H264Encoder) -> None:
        self._enc: H264Encoder | None = encoder
        self._inflight: asyncio.Future[EncodedFrame] | None = None

    def request_keyframe(self) -> None:
        if self._enc is not None:
            self._enc.request_keyframe()

    async def _settle(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._inflight)
        self._inflight = None

    async def encode(self, rgb: np.ndarray) -> EncodedFrame:
        await self._settle()
        if self._enc is None:
            raise ProcessingError("encoder is closed")
        self._inflight = asyncio.ensure_future(asyncio.to_thread(self._enc.encode, rgb))
        return await asyncio.shield(self._inflight)

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
        return InProcessEncoder(H264Encoder(width, height, fps, bitrate, gop_frames))
    return await pool.open(width, height, fps, bitrate, gop_frames)
