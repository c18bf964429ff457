"""A small protocol client for tests: real socket, real H.264 decoding of every frame.

It speaks the envelope ``{"type", "session_id", "data"}``; what it records is flattened to
``{"type", "session_id", **data}`` so that tests read fields directly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import websockets
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from bench import run_stream

FRAME_TYPES = ("VIDEO_FRAME", "ACTION_FRAME")


def read_wav(path: Path) -> bytes:
    """The fixture's PCM s16le bytes, as a client sends them."""
    return run_stream.read_wav(path).astype("<i2").tobytes()


def audio_chunk(pcm: bytes) -> dict[str, Any]:
    return {"data": base64.b64encode(pcm).decode(), "format": "pcm_s16le", "sample_rate": 16000,
            "channels": 1, "duration_ms": len(pcm) / 32.0}


def envelope(type_: str, session_id: str | None, **data: Any) -> dict[str, Any]:
    return {"type": type_, "session_id": session_id, "data": data}


def envelope_json(type_: str, session_id: str | None, **data: Any) -> str:
    """``envelope`` as the text a client sends."""
    return json.dumps(envelope(type_, session_id, **data))


def chunk_msg(session_id: str, pcm: bytes, **extra: Any) -> str:
    return envelope_json("GENERATE", session_id, audio_chunk=audio_chunk(pcm), **extra)


def flatten(m: dict[str, Any]) -> dict[str, Any]:
    """``{"type", "session_id", **data}`` of a server envelope."""
    assert set(m) == {"type", "session_id", "data"}, f"not an envelope: {sorted(m)}"
    return {"type": m["type"], "session_id": m["session_id"], **m["data"]}


class Client:
    def __init__(self, ws: Any, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.frames: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.images: list[np.ndarray] = []
        self.arrivals: list[float] = []
        self.decoder = av.CodecContext.create("h264", "r")
        self.decode = True
        self._pings = 0

    @classmethod
    async def connect(cls, base: str, user_id: str = "u1", init: bool = True,
                      **init_fields: Any) -> tuple[Client, dict[str, Any] | None]:
        ws = await websockets.connect(f"{base}/musetalk/v1/ws/{user_id}", max_size=2**24)
        client = cls(ws, str(uuid.uuid4()))
        reply = None
        if init:
            await client.send(envelope("INIT", client.session_id, user_id=user_id, **init_fields))
            reply = flatten(json.loads(await ws.recv()))
        return client, reply

    @classmethod
    async def watch(cls, base: str, user_id: str, session_id: str, decode: bool = True,
                    **init_fields: Any) -> tuple[Client, dict[str, Any]]:
        """A receive-only viewer of ``session_id`` (INIT with ``viewer``), and INIT's answer
        (INIT_SUCCESS or ERROR)."""
        client, _ = await cls.connect(base, user_id, init=False)
        client.session_id, client.decode = session_id, decode
        await client.msg("INIT", user_id=user_id, viewer=True, **init_fields)
        reply = await client.recv_until(lambda m: m["type"] in ("INIT_SUCCESS", "ERROR"))
        return client, reply

    async def send(self, msg: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(msg if isinstance(msg, str | bytes) else json.dumps(msg))

    async def msg(self, type_: str, **data: Any) -> None:
        await self.send(envelope(type_, self.session_id, **data))

    def _take(self, raw: dict[str, Any]) -> dict[str, Any]:
        m = flatten(raw)
        if m["type"] in FRAME_TYPES:
            self.frames.append(m)
            self.arrivals.append(time.monotonic())
            if self.decode:
                out = self.decoder.decode(av.Packet(base64.b64decode(m["frame_data"])))
                assert len(out) == 1, f"frame {m['frame_index']} did not decode to one picture"
                self.images.append(out[0].to_ndarray(format="rgb24"))
        else:
            self.events.append(m)
        return m

    async def _recv_until_msg(self, stop: Callable[[dict[str, Any]], bool], timeout: float,
                              what: str) -> dict[str, Any]:
        """Receive (recording every message) until ``stop(message)``; that message."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                break
            m = self._take(json.loads(raw))
            if stop(m):
                return m
        raise TimeoutError(f"no {what} within {timeout} s; {len(self.frames)} frames, "
                           f"events: {self.events[-5:]}")

    async def recv_until(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Receive until an event satisfying ``pred`` arrives; return it."""
        return await self._recv_until_msg(
            lambda m: m["type"] not in FRAME_TYPES and pred(m), timeout, "matching message")

    async def recv_frame(self, pred: Callable[[dict[str, Any]], bool] = lambda f: True,
                         timeout: float = 10.0) -> dict[str, Any]:
        """Receive until a frame satisfying ``pred`` arrives; return it."""
        return await self._recv_until_msg(
            lambda m: m["type"] in FRAME_TYPES and pred(m), timeout, "matching frame")

    async def recv_frames(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Receive until ``n`` more frames have arrived; those frames (in order)."""
        start = len(self.frames)
        if n > 0:
            await self._recv_until_msg(lambda m: len(self.frames) >= start + n, timeout,
                                       f"{n} frames")
        return self.frames[start : start + n]

    async def recv_until_holds(self, cond: Callable[[], bool], timeout: float = 10.0,
                               what: str = "the condition") -> None:
        """Receive (recording every message) until ``cond()`` holds: for state outside the
        messages (server counters). ``cond`` is checked after each message, and every 50 ms
        while none comes (the state may change while the stream is held up)."""
        end = time.monotonic() + timeout
        while not cond():
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not {what} within {timeout} s; {len(self.frames)} frames, "
                                   f"events: {self.events[-5:]}")
            try:
                raw = await asyncio.wait_for(self.ws.recv(), min(left, 0.05))
            except TimeoutError:
                continue
            self._take(json.loads(raw))

    async def sync(self, timeout: float = 10.0) -> dict[str, Any]:
        """PING and receive until its PONG: the server handled every message sent before (an
        ERROR that one of them caused has been received by now). Frames are not ordered with
        the PONG (control overtakes media): for them wait on frames (``recv_frames``)."""
        self._pings += 1
        t = self._pings
        await self.msg("PING", t=t)
        return await self.recv_until(lambda m: m["type"] == "PONG" and m["t"] == t, timeout)

    async def recv_until_time(self, deadline: float) -> None:
        """Receive until the monotonic clock reaches ``deadline``. Only for pacing what the test
        itself sends in real time (audio, pushed frames); a result is waited for with
        ``recv_until``/``recv_frame``/``recv_frames``/``sync``, never for a fixed time."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                return
            self._take(json.loads(raw))

    async def error(self, timeout: float = 5.0) -> dict[str, Any]:
        return await self.recv_until(lambda m: m["type"] == "ERROR", timeout)

    async def stream_audio(self, pcm: bytes, realtime: bool = True, chunk: int = 1280,
                           end: bool = True) -> None:
        """Send PCM as GENERATE chunks paced on absolute deadlines, receiving meanwhile."""
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(pcm), chunk)):
            await self.send(chunk_msg(self.session_id, pcm[i : i + chunk]))
            if realtime:
                await self.recv_until_time(t0 + (k + 1) * chunk / 32000.0)
        if end:
            await self.msg("END_OF_SPEECH")

    def speaking(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("utterance_frame") is not None]

    async def close(self) -> None:
        await self.ws.close()


async def next_of_type(ws: Any, want: str, timeout: float = 15.0) -> dict[str, Any]:
    """The next flat message (signaling's own protocol) of type ``want`` on ``ws``."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == want:
                return msg


def non_reading_socket(port: int, path: str, message: dict[str, Any]) -> socket.socket:
    """A raw socket speaking WebSocket through websockets' sans-I/O client protocol: it sends
    ``message`` and then never reads again, so its buffers fill up."""
    s, proto = raw_ws_client(port, path)
    proto.send_text(json.dumps(message).encode())
    s.sendall(b"".join(proto.data_to_send()))
    return s


def raw_ws_client(port: int, path: str,
                  timeout: float | None = None) -> tuple[socket.socket, ClientProtocol]:
    """A WebSocket client on a raw socket with a small receive buffer (websockets' sans-I/O
    protocol), past its handshake: it reads only when told to, so its buffers fill up."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"))
    proto.send_request(proto.connect())
    s.sendall(b"".join(proto.data_to_send()))
    while proto.state is State.CONNECTING:
        data = s.recv(4096)
        assert data, "the server closed the connection during the handshake"
        proto.receive_data(data)
    assert proto.handshake_exc is None, proto.handshake_exc
    return s, proto
