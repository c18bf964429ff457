"""Idle loops encoded once and shared: an idle frame costs a copy, not an encode.

A base clip plays as a ping-pong loop (``cursor.pingpong``: frames 0..n-1..1, period 2n-2).
Its whole period is encoded once per (avatar, clip, size, bitrate, GOP) as a sequence of closed
GOPs: an IDR with SPS/PPS every ``gop_frames`` frames from position 0, and position 0 again
when the loop wraps, so a decoder can enter the loop at any of those IDRs and play it round
and round. Every session on that avatar and setting serves its idle frames from these packets
(with its own frame indices and timestamps).

Splicing (see :mod:`..feed`): a session switches from its live encoder to the loop only
at a loop position that is an IDR, and back to live encoding by forcing its encoder's next
frame to be an IDR. Both directions therefore start a fresh closed GOP: no decoder ever
references a picture from the other stream.

Building: one build per key at a time (single flight), on the media threads ahead of all
other work (:data:`.threads.BUILD`; 0.2-0.3 s of one core at 512x512). While a key's loop is
being built, at most ``live_while_building`` sessions of that key encode their idle frames
live (a lone session starts at once); the others send nothing until it is there (a burst of
sessions costs one build, not one live encoder each, which would starve the build). The app
builds the default avatar's first loop at start-up (``IDLE_LOOPS_AT_START``), before it
reports ready, so a cold server's first sessions copy from their first frame. A failed build
is not retried for that key (its sessions encode live); the cache holds at most ``max_loops``
loops (least recently used out; a loop of 98 frames at 512x512 is 0.5-3 MB).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..cursor import loop_period, pingpong
from . import threads as media_threads
from .encoder import H264Encoder
from .picture import resize_to

log = logging.getLogger(__name__)
LIVE_WHILE_BUILDING = 2  # sessions per key that encode live while its loop is being built
MAX_FAILED = 64  # keys whose build failed, remembered so that they are not retried


class VideoSetting(Protocol):
    width: int
    height: int
    fps: int
    bitrate: int
    gop_frames: int


@dataclass(frozen=True)
class LoopKey:
    avatar_id: str
    clip: str
    width: int
    height: int
    fps: int
    bitrate: int
    gop_frames: int

    @classmethod
    def of(cls, avatar_id: str, clip: str, video: VideoSetting) -> LoopKey:
        """The key of ``clip``'s loop as a session with ``video`` settings plays it."""
        return cls(avatar_id, clip, video.width, video.height, video.fps, video.bitrate,
                   video.gop_frames)


@dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: one object per build
class EncodedLoop:
    """One ping-pong period of a clip: packet ``p`` shows loop position ``p``."""

    packets: tuple[bytes, ...]  # each Annex B access unit, as the encoder made it
    keyframe: tuple[bool, ...]
    nbytes: int

    @property
    def period(self) -> int:
        return len(self.packets)


def encode_loop(frames: np.ndarray, key: LoopKey) -> EncodedLoop:
    """Encode the ping-pong period of ``frames`` with an IDR at every GOP start."""
    n = len(frames)
    enc = H264Encoder(key.width, key.height, key.fps, key.bitrate, key.gop_frames)
    packets: list[bytes] = []
    keys: list[bool] = []
    total = 0
    try:
        for p in range(loop_period(n)):
            if p % key.gop_frames == 0:
                enc.request_keyframe()
            out = enc.encode(resize_to(frames[pingpong(p, n)], key.width, key.height))
            packets.append(out.data)
            keys.append(out.keyframe)
            total += len(out.data)
    finally:
        enc.close()
    return EncodedLoop(tuple(packets), tuple(keys), total)


class LoopCache:
    """Encoded loops shared by all sessions: built once per key on the media threads, LRU-bounded."""

    def __init__(self, max_loops: int = 16, live_while_building: int = LIVE_WHILE_BUILDING) -> None:
        self.max_loops = max_loops
        self.live_while_building = live_while_building
        self._loops: OrderedDict[LoopKey, EncodedLoop] = OrderedDict()
        self._building: dict[LoopKey, Future[None]] = {}
        self._live: dict[LoopKey, int] = {}  # sessions encoding live while the key builds
        self._failed: OrderedDict[LoopKey, None] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self.built = 0

    def get(self, key: LoopKey, frames: np.ndarray) -> EncodedLoop | None:
        """The loop for ``key`` if it is ready; otherwise start building it (unless a build
        runs or failed) and return None."""
        with self._lock:
            loop = self._loops.get(key)
            if loop is not None:
                self._loops.move_to_end(key)
                return loop
            if key in self._building or key in self._failed or self._closed:
                return None
            self._building[key] = media_threads.submit(self._build, key, frames,
                                                       due=media_threads.BUILD)
        return None

    def has(self, key: LoopKey) -> bool:
        """The loop for ``key`` is ready."""
        with self._lock:
            return key in self._loops

    def claim_live(self, key: LoopKey) -> bool:
        """May one more session encode ``key``'s idle frames live? Yes unless its loop is being
        built and ``live_while_building`` sessions already do (the claim ends with the build)."""
        with self._lock:
            if key not in self._building:
                return True
            n = self._live.get(key, 0)
            if n >= self.live_while_building:
                return False
            self._live[key] = n + 1
            return True

    async def ensure(self, key: LoopKey, frames: np.ndarray) -> EncodedLoop | None:
        """The loop for ``key``, built now if needed (None if its build failed)."""
        loop = self.get(key, frames)
        if loop is not None:
            return loop
        with self._lock:
            fut = self._building.get(key)
        if fut is not None:
            await asyncio.wrap_future(fut)
        with self._lock:
            return self._loops.get(key)

    def _build(self, key: LoopKey, frames: np.ndarray) -> None:
        try:
            loop = encode_loop(frames, key)
        except Exception:  # noqa: BLE001 - such sessions just keep encoding live
            log.exception("encoding the %s loop of %s failed", key.clip, key.avatar_id)
            with self._lock:
                self._done(key)
                self._failed[key] = None
                while len(self._failed) > MAX_FAILED:
                    self._failed.popitem(last=False)
            return
        with self._lock:
            self._done(key)
            self._loops[key] = loop
            self.built += 1
            while len(self._loops) > self.max_loops:
                self._loops.popitem(last=False)
        log.info("encoded the %s loop of %s: %d frames, %d KB", key.clip, key.avatar_id,
                 loop.period, loop.nbytes // 1024)

    def _done(self, key: LoopKey) -> None:
        self._building.pop(key, None)
        self._live.pop(key, None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"loops": len(self._loops), "building": len(self._building),
                    "bytes": sum(v.nbytes for v in self._loops.values()), "built": self.built}

    def close(self) -> None:
        """Cancel the builds not started yet and wait for the running ones."""
        with self._lock:
            self._closed = True
            futures = list(self._building.values())
        for fut in futures:
            fut.cancel()
        for fut in futures:
            if not fut.cancelled():
                fut.exception()  # waits; a failure was logged by _build
