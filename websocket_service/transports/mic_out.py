"""``/musetalk/v1/mic/{session_id}``: the microphone audio a WebRTC peer sends, for ASR.

Receive-only. Each piece of the peer's audio (16 kHz mono PCM s16le, before the speech gate)
comes as an envelope ``{"type": "MIC_AUDIO", "session_id", "data": {"timestamp_ms",
"sample_rate", "samples", "dropped", "data": base64}}`` (:class:`~..protocol.MicAudioData`);
``timestamp_ms`` is the piece's position in the peer's audio (pieces follow each other without
gaps unless this reader fell behind, when the oldest are dropped: at most ``MIC_QUEUE_PIECES``
wait, and ``dropped`` counts the loss). When the session ends, what was waiting is sent and
the socket closes with 1000. With ``AUTH_TOKEN`` or JWT keys set, send ``?token=`` (a JWT:
the session's user).
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from ..channel import ChannelClosed, DropOldest
from ..errors import CLOSE_NORMAL
from ..manager import Services
from ..protocol import MicAudioData, ServerMessage
from ..units import SAMPLE_RATE
from ..wire import b64
from .session_socket import open_session_socket

MIC_QUEUE_PIECES = 250  # about 5 s of 20 ms pieces


class MicReader:
    """One reader's bounded queue (drop-oldest); also the session's attachment that ends the
    socket."""

    def __init__(self, ws: WebSocket, session_id: str) -> None:
        self.ws, self.session_id = ws, session_id
        self.queue: DropOldest[tuple[int, np.ndarray]] = DropOldest(MIC_QUEUE_PIECES)

    def on_audio(self, ts: int, pcm: np.ndarray) -> None:
        self.queue.put((ts, pcm))

    async def aclose(self) -> None:
        self.queue.close()

    async def run(self) -> None:
        """Send every piece as MIC_AUDIO until the session ends (and what is left is sent)."""
        while True:
            try:
                ts, pcm = await self.queue.get()
            except ChannelClosed:
                return
            data = MicAudioData(timestamp_ms=ts, sample_rate=SAMPLE_RATE, samples=len(pcm),
                                dropped=self.queue.dropped,
                                data=b64(pcm.astype("<i2").tobytes()))
            await self.ws.send_text(ServerMessage(type="MIC_AUDIO", session_id=self.session_id,
                                                  data=data).to_json())


async def mic_endpoint(ws: WebSocket, session_id: str) -> None:
    session = await open_session_socket(ws, session_id)
    if session is None:
        return
    services: Services = ws.app.state.services
    reader = MicReader(ws, session_id)
    unsubscribe = session.mic.subscribe(reader.on_audio)
    services.sessions.attach(session_id, reader)
    sender = asyncio.create_task(reader.run(), name=f"mic-out-{session_id[:8]}")
    receiver = asyncio.create_task(_until_closed(ws), name=f"mic-in-{session_id[:8]}")
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        unsubscribe()
        services.sessions.detach(session_id, reader)
        for t in (sender, receiver):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await ws.close(code=CLOSE_NORMAL)


async def _until_closed(ws: WebSocket) -> None:
    """Read (and ignore) until the client goes away."""
    with contextlib.suppress(WebSocketDisconnect):
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
