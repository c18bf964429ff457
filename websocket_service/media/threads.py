"""The threads that render and encode frames, apart from the event loop's default executor.

Rendering (OpenCV, NumPy) and H.264 encoding (libx264 under PyAV) release the GIL for their
heavy parts, so threads run them in parallel across sessions. More threads than cores buy
nothing there and cost GIL hand-offs and context switches, which show up as late frames
(measured in docs/BENCHMARKS.md §0), so the pool is sized to the cores (``MEDIA_THREADS``;
0: one more than the cores). It is kept apart from the default executor, which also runs slow
blocking work (avatar preparation, uploads), so that such work never holds up a frame.

OpenCV's own thread pool is set to ``OPENCV_THREADS`` (default 1): every call works on one
small region, and the parallelism is across sessions.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import cv2

T = TypeVar("T")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_size = 0


def default_size() -> int:
    return (os.cpu_count() or 1) + 1


def configure(threads: int, opencv_threads: int) -> None:
    """Size the pool (0: :func:`default_size`) and OpenCV's threads (0: OpenCV's default).

    A pool of another size replaces the current one; work already submitted finishes there.
    """
    global _pool, _size
    cv2.setNumThreads(opencv_threads if opencv_threads > 0 else -1)
    size = threads if threads > 0 else default_size()
    with _lock:
        if _pool is not None and size != _size:
            _pool.shutdown(wait=False)
            _pool = None
        _size = size


def _executor() -> ThreadPoolExecutor:
    global _pool, _size
    with _lock:
        if _pool is None:
            _size = _size or default_size()
            _pool = ThreadPoolExecutor(_size, thread_name_prefix="media")
        return _pool


def size() -> int:
    """Threads the pool has (or will have when first used)."""
    return _size or default_size()


async def run(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a media thread."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), fn, *args)
