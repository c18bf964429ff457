"""Idle loops encoded once and shared: an idle frame costs a copy, not an encode.

A base clip plays as a ping-pong loop (``cursor.pingpong``: frames 0..n-1..1, period 2n-2).
Its whole period is encoded once per (avatar, clip, size, bitrate, GOP) as a sequence of closed
GOPs: an IDR with SPS/PPS every ``gop_frames`` frames from position 0, and position 0 again
when the loop wraps, so a decoder can enter the loop at any of those IDRs and play it round
and round. Every session on that avatar and setting serves its idle frames from these packets
(with its own frame indices and timestamps).

Splicing (see the WebSocket sink): a session switches from its live encoder to the loop only
at a loop position that is an IDR, and back to live encoding by forcing its encoder's next
frame to be an IDR. Both directions therefore start a fresh closed GOP: no decoder ever
references a picture from the other stream.

Encoding a loop takes about a second of one core; it runs in a worker thread on first use,
while the sessions that asked keep live-encoding. The cache holds at most ``max_loops`` loops
(least recently used out; a loop of 98 frames at 512x512 is 1-3 MB).
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..cursor import loop_period, pingpong, resize_to
from .encoder import H264Encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopKey:
    avatar_id: str
    clip: str
    width: int
    height: int
    fps: int
    bitrate: int
    gop_frames: int


@dataclass(frozen=True)
class EncodedLoop:
    """One ping-pong period of a clip: packet ``p`` shows loop position ``p``."""

    b64: tuple[str, ...]  # base64 of each Annex B access unit, as the protocol sends it
    keyframe: tuple[bool, ...]
    nbytes: int

    @property
    def period(self) -> int:
        return len(self.b64)


def encode_loop(frames: np.ndarray, key: LoopKey) -> EncodedLoop:
    """Encode the ping-pong period of ``frames`` with an IDR at every GOP start."""
    n = len(frames)
    enc = H264Encoder(key.width, key.height, key.fps, key.bitrate, key.gop_frames)
    b64, keys, total = [], [], 0
    try:
        for p in range(loop_period(n)):
            if p % key.gop_frames == 0:
                enc.request_keyframe()
            out = enc.encode(resize_to(frames[pingpong(p, n)], key.width, key.height))
            b64.append(base64.b64encode(out.data).decode("ascii"))
            keys.append(out.keyframe)
            total += len(out.data)
    finally:
        enc.close()
    return EncodedLoop(tuple(b64), tuple(keys), total)


class LoopCache:
    """Encoded loops shared by all sessions; built in one background thread, LRU-bounded."""

    def __init__(self, max_loops: int = 16) -> None:
        self.max_loops = max_loops
        self._loops: OrderedDict[LoopKey, EncodedLoop] = OrderedDict()
        self._building: set[LoopKey] = set()
        self._failed: set[LoopKey] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loop-encode")
        self.built = 0

    def get(self, key: LoopKey, frames: np.ndarray) -> EncodedLoop | None:
        """The loop for ``key`` if it is ready; otherwise start building it and return None."""
        with self._lock:
            loop = self._loops.get(key)
            if loop is not None:
                self._loops.move_to_end(key)
                return loop
            if key in self._building or key in self._failed:
                return None
            self._building.add(key)
        self._pool.submit(self._build, key, frames)
        return None

    def _build(self, key: LoopKey, frames: np.ndarray) -> None:
        try:
            loop = encode_loop(frames, key)
        except Exception:  # noqa: BLE001 - such sessions just keep encoding live
            log.exception("encoding the %s loop of %s failed", key.clip, key.avatar_id)
            with self._lock:
                self._building.discard(key)
                self._failed.add(key)
            return
        with self._lock:
            self._building.discard(key)
            self._loops[key] = loop
            self.built += 1
            while len(self._loops) > self.max_loops:
                self._loops.popitem(last=False)
        log.info("encoded the %s loop of %s: %d frames, %d KB", key.clip, key.avatar_id,
                 loop.period, loop.nbytes // 1024)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"loops": len(self._loops), "building": len(self._building),
                    "bytes": sum(v.nbytes for v in self._loops.values()), "built": self.built}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
