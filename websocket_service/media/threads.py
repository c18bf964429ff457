"""The threads that render and encode frames, apart from the event loop's default executor.

Rendering (OpenCV, NumPy) and H.264 encoding (libx264 under PyAV 16+) release the GIL for
their heavy parts, so threads run them in parallel across sessions. More threads than cores buy
nothing there and cost GIL hand-offs and context switches, so the pool is sized to the cores
(``MEDIA_THREADS``; 0: one per core). It is kept apart from the default executor,
which also runs slow blocking work (avatar preparation, uploads), so that such work never
holds up a frame.

Work is taken earliest due first (``due``: a ``time.monotonic()`` time), in submission order on
ties. An encode is due when it is submitted (its frame's tick has come). A speech render is due
when its first frame's audio was there (the slot's arrival), so every waiting render goes before
every encode submitted since, and the oldest render first: a render that waits shows as a frozen
mouth (an underrun) within a frame or two, while an encode that waits only delays its frame, and
a feed that fell behind encodes its backlog in one call (``SessionFeed``). An idle loop's build
(:data:`BUILD`, rare: once per avatar and video setting, see :mod:`.loops`) goes before
everything: sessions wait for it instead of encoding their idle frames live.

(A render due at its slot's arrival plus the engine's jitter allowance, so that renders with
slack yield to encodes, was measured and dropped: under overload late renders then take every
thread from the encodes, docs/BENCHMARKS.md section 4.)

OpenCV's own thread pool is set to ``OPENCV_THREADS`` (default 1): every call works on one
small region, and the parallelism is across sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import cv2

T = TypeVar("T")

#: the due time of an idle loop's build: before any frame's work
BUILD = -math.inf


class PriorityPool:
    """``threads`` daemon threads taking calls by (due time, submission order)."""

    def __init__(self, threads: int, name: str = "media") -> None:
        self.size = threads
        self._queue: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(threads)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, due: float, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("the media threads are shut down")
        fut: Future[T] = Future()
        self._queue.put((due, next(self._order), (fut, fn, args)))
        return fut

    def _work(self) -> None:
        while (item := self._queue.get()[2]) is not None:
            self._call(*item)
            item = None  # an idle thread keeps no call alive (its encoder, its frames)

    @staticmethod
    def _call(fut: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)

    def shutdown(self) -> None:
        """Threads end after the calls already queued (they are daemons: exit never waits)."""
        self._closed = True
        for _ in self._threads:
            self._queue.put((math.inf, next(self._order), None))


_lock = threading.Lock()
_pool: PriorityPool | None = None
_size = 0


def default_size() -> int:
    """One thread per core. With one more than the cores (the default until December 7) a
    burst of renders and encodes kept every core busy and the event loop's thread waited for
    one: at 16 speaking MuseTalk stand-in sessions on 2 cores it spent 41 % of the time
    runnable but not running (/proc schedstat), against 34 % running. One per core had the
    lower loop lag p99 in 11 of 12 paired runs (16 stand-in or 10 weight-free speaking
    sessions) and the lower p95 latency in 8 (docs/BENCHMARKS.md section 4)."""
    return os.cpu_count() or 1


def configure(threads: int, opencv_threads: int) -> None:
    """Size the pool (0: :func:`default_size`) and OpenCV's threads (0: OpenCV's default).

    A pool of another size replaces the current one; calls already queued finish there.
    """
    global _pool, _size
    cv2.setNumThreads(opencv_threads if opencv_threads > 0 else -1)
    size = threads if threads > 0 else default_size()
    with _lock:
        if _pool is not None and size != _pool.size:
            _pool.shutdown()
            _pool = None
        _size = size


def _get() -> PriorityPool:
    global _pool
    with _lock:
        if _pool is None:
            _pool = PriorityPool(size())
        return _pool


def size() -> int:
    """Threads the pool has (or will have when first used)."""
    return _size or default_size()


def submit(fn: Callable[..., T], *args: Any, due: float | None = None) -> Future[T]:
    """``fn(*args)`` on a media thread, from any thread: its future. ``due``: when its result
    is needed (``time.monotonic()``; None: now)."""
    return _get().submit(time.monotonic() if due is None else due, fn, *args)


async def run(fn: Callable[..., T], *args: Any, due: float | None = None) -> T:
    """``fn(*args)`` on a media thread, taken by ``due`` (None: now). Cancelling the caller
    cancels a call not started yet (``wrap_future`` passes the cancellation on); a started call
    runs to its end."""
    return await asyncio.wrap_future(submit(fn, *args, due=due))


async def outcome(fut: Future[T]) -> T:
    """``fut``'s result (a media-thread call's), back on the event loop in one hop.

    ``wrap_future`` under ``shield`` (and a task around it) took 3-4 turns of the event loop
    from the call's end to the waiting task, each behind every callback already due: under load
    that is milliseconds per frame. Here the call's end schedules the waiting task's wake-up
    directly. Cancelling the waiting task leaves the call alone (it runs to its end), where a
    bare ``wrap_future`` would cancel a call not started yet under a waiter that
    ``InProcessEncoder._settle`` may already be awaiting (its close then raised
    ``CancelledError``)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def copy(f: Future[T]) -> None:  # on the loop
        if done.done():
            return  # the waiting task was cancelled
        if f.cancelled():
            done.cancel()
        elif (exc := f.exception()) is not None:
            done.set_exception(exc)
        else:
            done.set_result(f.result())

    def back(f: Future[T]) -> None:  # on the thread that ended the call
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(copy, f)

    fut.add_done_callback(back)
    return await done

