"""RemoteMuseTalkProcessor: the avatar service with the avatar on another machine.

The bot runs anywhere (a CPU box); the avatar server (``run_server.py``, on a GPU) renders.
Like Simli or Tavus, but our own server and protocol: TTS audio goes out as 16 kHz
``GENERATE`` chunks (``END_OF_SPEECH`` ends each reply, ``INTERRUPT`` drops it), and the
server's 25 fps H.264 stream comes back. Each speech frame says where its audio starts in
all the audio sent (``frame_timestamp``, ms), so the processor pushes the picture and then
exactly those 40 ms of the original TTS audio; idle frames are pushed as they arrive. The
server paces the frames, so the processor needs no clock of its own.

A jitter buffer: the first ``jitter_s`` (120 ms) of each reply's pictures are held and then
pushed together, so the output transport's audio queue runs that far ahead of the network
and a stall of the connection up to that long is not heard as a gap (the reply starts that
much later; an interruption still stops it at once).

If the connection is lost (the server restarts, drains or drops it), the speech buffered for
the avatar is dropped, TTS audio passes through without video meanwhile (the bot keeps
talking), and the processor reconnects with a new session after a back-off that doubles from
``reconnect_backoff_s`` to ``RECONNECT_MAX_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import numpy as np
from pipecat.frames.frames import StartFrame
from websockets import ConnectionClosed

from ..units import SAMPLES_PER_FRAME
from .remote_client import RECONNECT_ERRORS, RemoteAvatarClient, RemoteFrame
from .service import FRAME_S, AvatarService
from .speech import Utterance

log = logging.getLogger(__name__)

SAMPLES_PER_MS = 16
RECONNECT_MAX_S = 10.0


class RemoteMuseTalkProcessor(AvatarService):
    """Lip-synced video from an avatar server at ``url`` (``ws://host:8000``)."""

    def __init__(self, url: str, *, user_id: str = "pipecat", auth_token: str | None = None,
                 resolution: str | None = None, reconnect: bool = True,
                 reconnect_backoff_s: float = 0.5, jitter_s: float = 0.12,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.jitter_s = jitter_s
        #: a reply's first pictures, held until they make ``jitter_s`` (None: passing through)
        self._held: list[tuple[Utterance, np.ndarray, int]] | None = []
        self.client = RemoteAvatarClient(url, user_id, auth_token, resolution)
        self.reconnect = reconnect
        self.reconnect_backoff_s = reconnect_backoff_s
        self.reconnects = 0  # sessions opened after a lost connection
        self._reader: asyncio.Task[None] | None = None
        self._connected = False

    @property
    def ready(self) -> bool:
        return self._connected

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        info = await self.client.connect()
        log.info("avatar server: engine %s, avatar %s, %s", info.get("engine"),
                 info.get("avatar"), (info.get("video_config") or {}).get("resolution"))
        self._connected = True
        self._reader = self.create_task(self._read(), "remote-avatar-reader")

    async def _shutdown(self) -> None:
        self._connected = False
        if self._reader is not None:
            await self.cancel_task(self._reader)
            self._reader = None
        await self.client.close()
        self._utts.clear()

    # ------------------------------------------------------------------ to the server
    async def _speech_in(self, pcm: np.ndarray) -> None:
        with contextlib.suppress(ConnectionClosed):  # the reader notices, and reconnects
            await self.client.send_audio(pcm)

    async def _speech_end(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.client.end_of_speech()

    async def _speech_interrupt(self) -> None:
        if self._connected:
            with contextlib.suppress(ConnectionClosed):
                await self.client.interrupt()

    # ------------------------------------------------------------------ from the server
    async def _read(self) -> None:
        while True:
            async for event in self.client.events():
                await self._end_if_quiet(self.clock.now())
                if isinstance(event, RemoteFrame):
                    await self._frame(event)
                elif event.get("type") == "ERROR":
                    log.warning("avatar server: %s %s", event.get("code"), event.get("message"))
                    await self.push_error(f"avatar server: {event.get('code')}: "
                                          f"{event.get('message')}")
            if not self._connected:  # we closed it
                return
            if not self.reconnect:
                await self.push_error("avatar server closed the connection",
                                      force_treat_as_permanent=True)
                return
            await self._lost()
            await self._reconnect()

    async def _lost(self) -> None:
        """Drop what the lost session was to show; speech passes through until reconnected."""
        log.warning("avatar server connection lost; reconnecting")
        self._connected = False
        await self.interrupt()
        self._samples_out = 0  # the next session's audio clock starts at zero
        await self.push_error("avatar server connection lost; reconnecting (speech goes on "
                              "without video meanwhile)")

    async def _reconnect(self) -> None:
        delay = self.reconnect_backoff_s
        while True:
            await asyncio.sleep(delay)
            try:
                info = await self.client.reconnect()
            except RECONNECT_ERRORS as exc:
                delay = min(delay * 2, RECONNECT_MAX_S)
                log.warning("avatar server: reconnect failed (%s); next try in %.1f s", exc,
                            delay)
                continue
            log.info("avatar server: reconnected, session %s", info.get("session_id") or
                     self.client.session_id)
            self.reconnects += 1
            self._connected = True
            return

    async def _frame(self, f: RemoteFrame) -> None:
        if f.utterance_id is None:
            await self._release()
            self._held = []  # the next reply is held again
            await self._show_idle(f.image)
            return
        sample = f.timestamp_ms * SAMPLES_PER_MS  # in all the audio sent
        utt = self._utterance_at(sample)
        if utt is None:  # speech from before an interruption, still in flight
            return
        if self._held is None:
            await self._show(utt, f.image, sample - utt.offset)
            return
        self._held.append((utt, f.image, sample - utt.offset))
        last = utt.ended and sample - utt.offset + SAMPLES_PER_FRAME >= utt.engine_samples
        if last or len(self._held) * FRAME_S >= self.jitter_s - 1e-9:
            await self._release()

    async def _release(self) -> None:
        """Push the held pictures (and their audio); what follows passes straight through."""
        held, self._held, epoch = self._held or [], None, self._epoch
        for utt, image, sample in held:
            if self._epoch != epoch:  # interrupted meanwhile
                return
            await self._show(utt, image, sample)

    async def interrupt(self) -> None:
        self._held = []
        await super().interrupt()

    def _utterance_at(self, sample: int) -> Utterance | None:
        for utt in self._utts:
            if utt.offset <= sample < utt.offset + max(utt.engine_samples, SAMPLES_PER_FRAME):
                return utt
        return None
