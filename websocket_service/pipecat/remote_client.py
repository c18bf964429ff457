"""A client of the avatar server's WebSocket protocol (``musetalk_websocket_spec.md``).

Every message is an envelope ``{"type", "session_id", "data"}``. The client sends ``INIT``,
16 kHz PCM in ``GENERATE``, ``END_OF_SPEECH``, ``INTERRUPT`` and ``CLOSE``; it receives
``VIDEO_FRAME``/``ACTION_FRAME`` (one H.264 access unit each, decoded here with PyAV into
RGB pictures), ``SPEECH_ENDED`` and ``ERROR``. The server paces the frames at 25 fps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import websockets

from ..units import SAMPLE_RATE

MAX_CHUNK_SAMPLES = SAMPLE_RATE  # 1 s per GENERATE (the server accepts up to MAX_CHUNK_MS)
FRAME_TYPES = ("VIDEO_FRAME", "ACTION_FRAME")
INIT_TIMEOUT_S = 15.0  # INIT -> INIT_SUCCESS (a cold server may load its engine first)


class RemoteAvatarError(RuntimeError):
    """The server refused (``ERROR``) or the connection failed."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.details = details or {}


#: what a failed (re)connection raises: refused, unreachable, closed during INIT, a timeout
RECONNECT_ERRORS = (OSError, TimeoutError, websockets.WebSocketException, RemoteAvatarError,
                    json.JSONDecodeError)


@dataclass
class RemoteFrame:
    """One decoded picture of the server's timeline."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    index: int
    timestamp_ms: int  # speech: where its audio starts in all the audio sent so far
    state: str
    utterance_id: int | None = None
    utterance_frame: int | None = None


class RemoteAvatarClient:
    """One session on an avatar server: ``connect``, send audio, iterate ``events``."""

    def __init__(self, url: str, user_id: str = "pipecat", auth_token: str | None = None,
                 resolution: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.user_id = user_id
        self.auth_token = auth_token
        self.resolution = resolution
        self.session_id = str(uuid.uuid4())
        self.info: dict[str, Any] = {}
        self.samples_sent = 0
        self._ws: Any = None
        self._decoder = av.CodecContext.create("h264", "r")

    async def connect(self) -> dict[str, Any]:
        """Open the socket and the session; returns ``INIT_SUCCESS.data``."""
        self._ws = await websockets.connect(f"{self.url}/musetalk/v1/ws/{self.user_id}",
                                            max_size=2**24)
        video: dict[str, Any] = {"fps": 25}
        if self.resolution:
            video["resolution"] = self.resolution
        data: dict[str, Any] = {"user_id": self.user_id, "video_config": video}
        if self.auth_token:
            data["auth_token"] = self.auth_token
        await self._send("INIT", **data)
        reply = json.loads(await asyncio.wait_for(self._ws.recv(), INIT_TIMEOUT_S))
        if reply.get("type") != "INIT_SUCCESS":
            self._raise(reply)
        self.info = reply["data"]
        return self.info

    async def reconnect(self) -> dict[str, Any]:
        """A new session after a lost connection: new id, audio clock and decoder."""
        if self._ws is not None:
            with contextlib.suppress(websockets.WebSocketException, OSError):
                await self._ws.close()
            self._ws = None
        self.session_id = str(uuid.uuid4())
        self.samples_sent = 0
        self._decoder = av.CodecContext.create("h264", "r")
        return await self.connect()

    async def _send(self, type_: str, **data: Any) -> None:
        await self._ws.send(json.dumps({"type": type_, "session_id": self.session_id,
                                        "data": data}))

    @staticmethod
    def _raise(msg: dict[str, Any]) -> None:
        d = msg.get("data") or {}
        raise RemoteAvatarError(d.get("code", "UNEXPECTED"), d.get("message", str(msg)[:200]),
                                d.get("details"))

    async def send_audio(self, pcm: np.ndarray) -> None:
        """16 kHz mono int16 samples, in GENERATE chunks of at most 1 s."""
        for i in range(0, len(pcm), MAX_CHUNK_SAMPLES):
            piece = np.ascontiguousarray(pcm[i:i + MAX_CHUNK_SAMPLES], "<i2").tobytes()
            await self._send("GENERATE", audio_chunk={
                "format": "pcm_s16le", "sample_rate": SAMPLE_RATE, "channels": 1,
                "duration_ms": len(piece) / 32, "data": base64.b64encode(piece).decode()})
            self.samples_sent += len(piece) // 2

    async def end_of_speech(self) -> None:
        await self._send("END_OF_SPEECH")

    async def interrupt(self) -> None:
        await self._send("INTERRUPT")

    async def close(self) -> None:
        """CLOSE, then the socket (the server answers CLOSE_ACK and closes)."""
        if self._ws is None:
            return
        try:
            await self._send("CLOSE", reason="client_request")
        except websockets.ConnectionClosed:
            pass
        await self._ws.close()
        self._ws = None

    async def events(self) -> AsyncIterator[RemoteFrame | dict[str, Any]]:
        """Decoded frames, and the other messages as ``{"type", **data}``; ends when closed."""
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if msg.get("type") == "ERROR":
                    yield {"type": "ERROR", **(msg.get("data") or {})}
                elif msg.get("type") in FRAME_TYPES:
                    frame = await asyncio.to_thread(self._decode, msg["data"])
                    if frame is not None:
                        yield frame
                else:
                    yield {"type": msg.get("type"), **(msg.get("data") or {})}
        except websockets.ConnectionClosed:
            return

    def _decode(self, d: dict[str, Any]) -> RemoteFrame | None:
        pictures = self._decoder.decode(av.Packet(base64.b64decode(d["frame_data"])))
        if not pictures:
            return None
        return RemoteFrame(pictures[-1].to_ndarray(format="rgb24"), d["frame_index"],
                           d["frame_timestamp"], d.get("state", "idle"), d.get("utterance_id"),
                           d.get("utterance_frame"))
