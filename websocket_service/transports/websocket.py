"""The WebSocket transport: parse client messages, serialise session output.

It never touches an engine. Frames are H.264-encoded here (one encoder per connection, off the
event loop: in the encoder process pool, or in a thread with ``encoder_processes=0``) and sent
as base64 JSON; a slow reader loses the oldest *raw* frames before they are encoded, so every
frame that is sent still decodes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocketState

from ..api.auth import check_token
from ..errors import (
    InvalidMessage,
    InvalidSession,
    ProcessingError,
    ServiceError,
)
from ..manager import Services
from ..media.encoder_pool import EncoderPool, InProcessEncoder, PoolEncoder, open_encoder
from ..protocol import (
    CLIENT_ADAPTER,
    CLIENT_TYPES,
    USER_ID_RE,
    ActionFrame,
    ActionMsg,
    CloseAck,
    CloseMsg,
    EndOfSpeechMsg,
    ErrorMsg,
    GenerateMsg,
    InitMsg,
    InitSuccess,
    InterruptMsg,
    PingMsg,
    Pong,
    StateChangeMsg,
    VideoFrame,
    pcm_from_bytes,
)
from ..session import OutputFrame, Session
from ..states import AvatarState

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 256
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013


class _Overflow(Exception):
    """The client is so far behind that even control events pile up."""


class WebSocketSink:
    """Bounded outbox for one connection: drop-oldest for frames, never for events."""

    def __init__(self, session: Session, max_frames: int) -> None:
        self.session = session
        self.max_frames = max_frames
        self._items: deque[OutputFrame | BaseModel] = deque()
        self._frames = 0
        self._events = 0
        self._wake = asyncio.Event()
        self.encoder: PoolEncoder | InProcessEncoder | None = None

    async def open_encoder(self, pool: EncoderPool | None) -> None:
        """Open this connection's encoder: in ``pool``'s processes, or in-process without one."""
        v = self.session.video
        self.encoder = await open_encoder(pool, v.width, v.height, v.fps, v.bitrate, v.gop_frames)

    async def close(self) -> None:
        if self.encoder is not None:
            await self.encoder.close()

    def on_frame(self, frame: OutputFrame) -> None:
        if self._frames >= self.max_frames:
            for i, item in enumerate(self._items):
                if isinstance(item, OutputFrame):
                    del self._items[i]
                    self._frames -= 1
                    self.session.stats.frames_dropped += 1
                    break
        self._items.append(frame)
        self._frames += 1
        self._wake.set()

    def on_event(self, event: BaseModel) -> None:
        self._items.append(event)
        self._events += 1
        self._wake.set()

    async def run(self, ws: WebSocket) -> None:
        """Send until cancelled. Raises _Overflow if events pile up past their bound."""
        while True:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._events > MAX_PENDING_EVENTS:
                raise _Overflow
            item = self._items.popleft()
            if isinstance(item, OutputFrame):
                self._frames -= 1
                await self._send_frame(ws, item)
            else:
                self._events -= 1
                if isinstance(item, ErrorMsg):
                    self.session.stats.errors_sent += 1
                await ws.send_text(item.model_dump_json(exclude_none=True))

    async def _send_frame(self, ws: WebSocket, f: OutputFrame) -> None:
        assert self.encoder is not None
        try:
            enc = await self.encoder.encode(f.image)
        except ProcessingError as err:  # e.g. an encoder process died: skip, the next is a keyframe
            log.warning("session %s: %s", self.session.session_id, err.message)
            self.on_event(_error_msg(err, self.session.session_id))
            return
        data = base64.b64encode(enc.data).decode("ascii")
        sid = self.session.session_id
        msg: BaseModel
        if f.state is AvatarState.ACTION and f.action:
            msg = ActionFrame(session_id=sid, action_name=f.action, progress=round(f.progress, 4),
                              frame_index=f.index, timestamp_ms=f.timestamp_ms, keyframe=enc.keyframe,
                              data=data, utterance_id=f.utterance_id, utterance_frame=f.utterance_frame)
        else:
            msg = VideoFrame(session_id=sid, frame_index=f.index, timestamp_ms=f.timestamp_ms,
                             state=f.state, keyframe=enc.keyframe, data=data,
                             utterance_id=f.utterance_id, utterance_frame=f.utterance_frame)
        text = msg.model_dump_json(exclude_none=True)
        await ws.send_text(text)
        self.session.stats.frame_sent(f.audio_arrival, f.created, self.session.clock.now(), len(text))

    async def drain(self, ws: WebSocket, timeout: float = 2.0) -> None:
        """Send the control events still queued (frames are dropped), e.g. before closing."""
        events = [i for i in self._items if not isinstance(i, OutputFrame)]
        self._items.clear()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                for ev in events:
                    await ws.send_text(ev.model_dump_json(exclude_none=True))


def _error_msg(err: ServiceError, session_id: str | None) -> ErrorMsg:
    return ErrorMsg(code=err.code, message=err.message, details=err.details, session_id=session_id)


def _validation_error(exc: ValidationError, raw: Any) -> InvalidMessage:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    if first.get("type") == "union_tag_invalid" or first.get("type") == "union_tag_not_found":
        got = raw.get("type") if isinstance(raw, dict) else None
        return InvalidMessage(f"unknown message type {got!r}" if got else "message has no 'type' field",
                              {"expected_types": CLIENT_TYPES})
    fields = [{"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
              for e in errors[:10]]
    where = fields[0]["field"] if fields else "message"
    return InvalidMessage(f"invalid {where}: {fields[0]['problem'] if fields else 'bad value'}",
                          {"errors": fields})


class Connection:
    """One client connection; at most one session on it."""

    def __init__(self, ws: WebSocket, services: Services, user_id: str) -> None:
        self.ws = ws
        self.services = services
        self.settings = services.settings
        self.user_id = user_id
        self.session: Session | None = None
        self.sink: WebSocketSink | None = None
        self._sender: asyncio.Task[None] | None = None
        self._recv: asyncio.Task[None]
        self._closing = False

    # ---------------------------------------------------------------- sending
    async def _send_direct(self, msg: BaseModel) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            await self.ws.send_text(msg.model_dump_json(exclude_none=True))

    async def report(self, err: ServiceError) -> None:
        sid = self.session.session_id if self.session else None
        msg = _error_msg(err, sid)
        if self.sink is not None:
            self.sink.on_event(msg)
        else:
            await self._send_direct(msg)

    async def _close(self, code: int, reason: str) -> None:
        self._closing = True
        if self._sender is not None:  # one writer at a time: stop the sender, then drain
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        if self.sink is not None:
            await self.sink.drain(self.ws)
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.ws.close(code=code, reason=reason[:120])

    # ---------------------------------------------------------------- main loop
    async def run(self) -> None:
        if not USER_ID_RE.match(self.user_id):
            await self._send_direct(_error_msg(InvalidMessage(
                "user_id must be 1-64 characters of letters, digits, '-' and '_'",
                {"user_id": self.user_id[:80]}), None))
            await self._close(CLOSE_POLICY, "invalid user_id")
            return
        self._recv = asyncio.create_task(self._receive_loop(), name=f"ws-recv-{self.user_id}")
        try:
            # the sender cancels the receive task if the client stops reading
            await asyncio.wait({self._recv})
            if not self._recv.cancelled():
                exc = self._recv.exception()
                if exc is not None and not isinstance(exc, WebSocketDisconnect):
                    log.error("connection %s failed", self.user_id, exc_info=exc)
        finally:
            self._recv.cancel()
            await self._teardown()

    async def _receive_loop(self) -> None:
        while not self._closing:
            timeout = None if self.session else self.settings.init_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    message = await self.ws.receive()
            except TimeoutError:
                await self.report(InvalidSession(
                    f"no INIT within {self.settings.init_timeout_s:g} s", fatal=True))
                await self._close(CLOSE_POLICY, "INIT timeout")
                return
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            try:
                await self._handle(message)
            except ServiceError as err:
                await self.report(err)
                if err.fatal:
                    code = CLOSE_TRY_AGAIN if err.code == "RATE_LIMIT_EXCEEDED" else CLOSE_POLICY
                    await self._close(code, err.code)
                    return

    async def _handle(self, message: Mapping[str, Any]) -> None:
        text, data = message.get("text"), message.get("bytes")
        if data is not None:
            size = len(data)
        else:
            size = len(text.encode("utf-8")) if text is not None else 0
        if size > self.settings.max_message_bytes:
            raise InvalidMessage(f"message of {size} bytes exceeds the limit of "
                                 f"{self.settings.max_message_bytes} bytes",
                                 {"max_message_bytes": self.settings.max_message_bytes})
        if data is not None:
            self._require_session().push_audio(self._pcm_bytes(data))
            return
        try:
            raw = json.loads(text or "")
        except (json.JSONDecodeError, TypeError) as exc:
            raise InvalidMessage("message is not valid JSON", {"position": getattr(exc, "pos", None)}) from None
        try:
            msg = CLIENT_ADAPTER.validate_python(raw)
        except ValidationError as exc:
            raise _validation_error(exc, raw) from None
        await self._dispatch(msg)

    def _pcm_bytes(self, data: bytes) -> Any:
        try:
            return pcm_from_bytes(data, self.settings.max_chunk_ms)
        except ValueError as exc:
            raise InvalidMessage(str(exc)) from None

    def _require_session(self, session_id: str | None = None) -> Session:
        if self.session is None:
            raise InvalidSession("no session: send INIT first")
        if session_id is not None and session_id != self.session.session_id:
            raise InvalidSession("session_id does not match this connection's session",
                                 {"session_id": session_id[:64]})
        return self.session

    def _chunk(self, chunk: Any) -> Any:
        try:
            return chunk.pcm(self.settings.max_chunk_ms)
        except ValueError as exc:
            raise InvalidMessage(str(exc)) from None

    async def _dispatch(self, msg: Any) -> None:  # noqa: C901 - a flat switch over message types
        if isinstance(msg, InitMsg):
            await self._init(msg)
            return
        if isinstance(msg, PingMsg):
            now_ms = int(self.services.sessions.clock.now() * 1000)
            await self.report_event(Pong(t=msg.t, server_time_ms=now_ms))
            return
        session = self._require_session(msg.session_id)
        if isinstance(msg, GenerateMsg):
            session.push_audio(self._chunk(msg.audio_chunk), msg.end_of_speech)
        elif isinstance(msg, StateChangeMsg):
            session.change_state(msg.target_state, msg.base_video)
        elif isinstance(msg, ActionMsg):
            pcm = self._chunk(msg.audio_chunk) if msg.audio_chunk else None
            session.start_action(msg.action_name, pcm)
        elif isinstance(msg, InterruptMsg):
            session.interrupt()
        elif isinstance(msg, EndOfSpeechMsg):
            session.end_of_speech()
        elif isinstance(msg, CloseMsg):
            reason = msg.reason or "client closed"
            await self.report_event(CloseAck(session_id=session.session_id, reason=reason))
            await self._close(1000, "closed")

    async def report_event(self, event: BaseModel) -> None:
        if self.sink is not None:
            self.sink.on_event(event)
        else:
            await self._send_direct(event)

    async def _init(self, msg: InitMsg) -> None:
        if self.session is not None:
            raise InvalidMessage("this connection already has a session", {"session_id": self.session.session_id})
        if msg.user_id != self.user_id:
            raise InvalidMessage("INIT user_id does not match the URL's user_id",
                                 {"url_user_id": self.user_id})
        check_token(self.settings.auth_token, msg.auth_token)
        session = await self.services.sessions.create(msg.session_id, self.user_id, msg.video_config)
        self.session = session
        sink = await self._open_sink(session)
        avatar = session.avatar
        try:
            await self._send_direct(InitSuccess(
                session_id=session.session_id, model_status=self.services.engine.info(),
                engine=self.services.engine.name, avatar=avatar.avatar_id,
                base_videos=avatar.base_videos, actions=avatar.actions,
                video_config={**session.video.as_dict(), "base_video": session.cursor.base_video}))
        except BaseException:
            await sink.close()  # frees the encoder's worker slot and shared memory
            raise
        self.sink = sink
        session.add_sink(sink)
        session.start()
        self._sender = asyncio.create_task(self._send_loop(), name=f"ws-send-{session.session_id[:8]}")

    async def _open_sink(self, session: Session) -> WebSocketSink:
        sink = WebSocketSink(session, self.settings.send_queue_frames)
        try:
            await sink.open_encoder(self.services.encoders)
        except ValueError as exc:
            raise ProcessingError(f"cannot encode this video size: {exc}") from None
        return sink

    async def _send_loop(self) -> None:
        assert self.sink is not None
        try:
            await self.sink.run(self.ws)
        except _Overflow:
            log.warning("session %s: client not reading; closing",
                        self.session.session_id if self.session else "-")
            self._closing = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.ws.close(code=CLOSE_POLICY, reason="client not reading")
            self._recv.cancel()
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._closing = True  # the socket went away
            self._recv.cancel()

    async def _teardown(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        if self.sink is not None:
            await self.sink.close()
        if self.session is not None:
            await self.services.sessions.close(self.session.session_id)



async def websocket_endpoint(ws: WebSocket, user_id: str) -> None:
    services: Services = ws.app.state.services
    await ws.accept()
    await Connection(ws, services, user_id).run()
