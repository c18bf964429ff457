"""Small helpers that several test files use (one copy each: import them from here).

Which test support module is for what:

* ``test/support.py`` (this one): waiting on a condition (``until``, ``poll``,
  ``wait_until``, ``wait_job``), tokens (``jwt_token``), test media written to disk
  (``face_photo``, ``face_video``, ``write_wav``), process memory (``rss_mb``).
* ``test/wsclient.py``: the WebSocket protocol client (``Client``: connect or ``watch``,
  receive until an event, a frame, N frames or a condition, ``sync`` by PING/PONG) and
  raw-socket clients that stop reading.
* ``test/live_server.py``: the real app served by uvicorn on a loopback port (``LiveServer``,
  ``MakeServer``, ``rtc_server``).
* ``test/conftest.py``: the fixtures (``server``, ``make_server``, ``browser``).
* ``test/rtc_client.py``: an aiortc peer that offers, receives and sends media.
* ``test/geometric_support.py``: process-cached geometric engine, avatar store and fixtures.
* ``test/churn_support.py``: sessions opened and closed the ways clients end them.
* ``test/cluster_support.py``: the Ray Serve cluster tests' tokens, ``Cluster`` and ``Peer``.
* ``test/musetalk_tiny.py``: the tiny MuseTalk model, its speech, avatar and bases.
* ``test/process_support.py``, ``test/browser.py``: child processes, headless Chromium.

Tests wait on events and predicates (these helpers, ``Client.recv_*``), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import cv2
import jwt
import numpy as np
from skimage import data


async def until(cond: Callable[[], Any], timeout: float = 15.0, what: str = "the condition") -> Any:
    """Wait (polling the event loop) until ``cond()`` is true, for state that other tasks and
    threads change (aiortc's counters, a server's); its value. Fails after ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := cond()):  # noqa: ASYNC110 - no event to wait on
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


async def poll(http: Any, path: str, pred: Callable[[Any], Any], timeout: float = 10.0,
               headers: dict[str, str] | None = None) -> Any:
    """GET ``path`` with ``http`` (an ``httpx.AsyncClient``) until its JSON satisfies ``pred``;
    that JSON. Fails after ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred(body := (await http.get(path, headers=headers)).json()):
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)
    return body


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "the condition") -> None:
    """``until`` for synchronous tests: poll ``cond()`` until it holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def jwt_token(key: Any, sub: str = "u1", exp_in: float = 60.0, alg: str = "HS256") -> str:
    """A JWT for user ``sub`` signed with ``key``, expiring ``exp_in`` s from now."""
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in)}, key, algorithm=alg)


def wait_job(http: Any, url: str, timeout: float = 60) -> dict[str, Any]:
    """Poll a job at ``url`` (``http.get(url).json()``) until it is done or failed; its last
    state. Its progress never goes backwards meanwhile."""
    deadline = time.monotonic() + timeout
    seen: list[Any] = []
    while time.monotonic() < deadline:
        job = http.get(url).json()
        seen.append(job.get("progress", 0))
        if job["status"] in ("done", "failed"):
            assert seen == sorted(seen), f"progress went backwards: {seen}"
            return job
        time.sleep(0.1)
    raise TimeoutError(job)


def face_photo(path: Path) -> None:
    """skimage's astronaut (a face) as an image file (its format from the suffix)."""
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))


def face_video(path: Path, frames: int = 25) -> None:
    """A 320x320 H.264 video of a face (skimage's astronaut) panning slowly, ``frames`` long."""
    img = cv2.resize(data.astronaut(), (320, 320))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = 320
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = np.roll(img, i // 4, axis=1)
            for p in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)


def write_wav(path: Path, pcm16k: np.ndarray, rate: int = 16000, channels: int = 1,
              width: int = 2) -> None:
    """``pcm16k`` (16 kHz mono int16) resampled to ``rate`` with ``channels`` channels."""
    n = round(len(pcm16k) * rate / 16000)
    x = np.interp(np.arange(n) * 16000 / rate, np.arange(len(pcm16k)), pcm16k.astype(np.float64))
    cols = np.stack([x * (1.0 - 0.25 * c) for c in range(channels)], axis=1)
    raw = (cols / 256 + 128).astype(np.uint8) if width == 1 else cols.astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw.tobytes())


def rss_mb() -> float:
    """This process's resident memory, MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
