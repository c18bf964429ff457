"""The encoder pool's worker process: many H.264 encoders keyed by id, served over a pipe.

Requests are tuples ``(op, request_id, encoder_id, *args)``; every one gets a reply
``(request_id, ok, payload)``. ``open`` maps the encoder's shared-memory I420 slot, ``enc``
encodes what the parent wrote there, ``close`` drops the encoder. See :mod:`.encoder_pool`.
"""

from __future__ import annotations

import mmap
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .encoder import H264Encoder


def _attach(name: str, size: int) -> tuple[mmap.mmap, np.ndarray]:
    # map /dev/shm directly: SharedMemory() would register the segment with the shared
    # resource tracker a second time, and the parent owns (and unlinks) it
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        buf = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return buf, np.frombuffer(buf, np.uint8)


def _serve(encoders: dict[int, Any], msg: tuple) -> Any:
    op, eid = msg[0], msg[2]
    if op == "enc":
        enc, _, view = encoders[eid]
        if msg[3]:
            enc.request_keyframe()
        out = enc.encode_i420(view.reshape(enc.height * 3 // 2, enc.width))
        return out.data, out.keyframe, out.pts
    if op == "open":
        _, _, _, w, h, fps, bitrate, gop, shm_name, pts = msg
        enc = H264Encoder(w, h, fps, bitrate, gop, start_pts=pts)
        encoders[eid] = (enc, *_attach(shm_name, w * h * 3 // 2))
        return None
    if op == "close":
        enc, buf, view = encoders.pop(eid)
        enc.close()
        del view
        buf.close()
        return None
    raise ValueError(f"unknown request {op!r}")


def worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    encoders: dict[int, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (msg[1], True, _serve(encoders, msg))
        except Exception as exc:  # reported to the caller, the worker keeps serving
            reply = (msg[1], False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except OSError:  # the parent closed the pool
            return
