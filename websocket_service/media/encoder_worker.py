"""The encoder pool's worker process: many H.264 encoders keyed by id.

These functions run inside a worker of a one-process ``ProcessPoolExecutor`` (see
:mod:`.encoder_pool`), so every call for a slot reaches the same process and its encoders.
``open_encoder`` maps the encoder's shared-memory I420 slot, ``encode`` encodes what the
parent wrote there, ``close_encoder`` drops the encoder.
"""

from __future__ import annotations

import mmap
import os
import signal
from typing import Any

import numpy as np

from .encoder import H264Encoder

#: this process's encoders: id -> (encoder, mapping, I420 view of the mapping)
_encoders: dict[int, tuple[H264Encoder, mmap.mmap, np.ndarray]] = {}


def init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop


def _attach(name: str, size: int) -> tuple[mmap.mmap, np.ndarray]:
    # map /dev/shm directly: SharedMemory() would register the segment with the shared
    # resource tracker a second time, and the parent owns (and unlinks) it
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        buf = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return buf, np.frombuffer(buf, np.uint8)


def open_encoder(eid: int, width: int, height: int, fps: int, bitrate: int, gop: int,
                 shm_name: str, pts: int) -> int:
    """Create encoder ``eid`` on the parent's slot ``shm_name``; returns this process's pid."""
    enc = H264Encoder(width, height, fps, bitrate, gop, start_pts=pts)
    _encoders[eid] = (enc, *_attach(shm_name, width * height * 3 // 2))
    return os.getpid()


def encode(eid: int, keyframe: bool) -> tuple[bytes, bool, int]:
    """Encode the frame the parent wrote into ``eid``'s slot: (Annex B, keyframe, pts)."""
    enc, _, view = _encoders[eid]
    if keyframe:
        enc.request_keyframe()
    out = enc.encode_i420(view.reshape(enc.height * 3 // 2, enc.width))
    return out.data, out.keyframe, out.pts


def close_encoder(eid: int) -> None:
    entry = _encoders.pop(eid, None)
    if entry is None:
        return
    enc, buf, view = entry
    enc.close()
    del view, entry
    buf.close()


def open_count() -> Any:
    """How many encoders this process hosts (for tests)."""
    return len(_encoders)
