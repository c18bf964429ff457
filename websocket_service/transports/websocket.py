"""The WebSocket transport: parse client messages, serialise session output.

It never touches an engine. Frames are H.264-encoded here (one encoder per connection, off the
event loop: in the encoder process pool, or in a thread with ``encoder_processes=0``) and sent
as base64 JSON; a slow reader loses the oldest *raw* frames before they are encoded, so every
frame that is sent still decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from ..api.auth import check_token
from ..errors import (
    InternalError,
    InvalidMessage,
    InvalidSession,
    ProcessingError,
    ServiceError,
)
from ..events import ClosedByClient, SessionEvent
from ..manager import Services
from ..media.encoder_pool import EncoderPool, InProcessEncoder, PoolEncoder, open_encoder
from ..media.loops import LoopCache, LoopKey
from ..protocol import (
    CLIENT_ADAPTER,
    ActionMsg,
    CloseMsg,
    EndOfSpeechMsg,
    GenerateMsg,
    InitMsg,
    InitSuccessData,
    InterruptMsg,
    KeyframeRequestMsg,
    PingMsg,
    PongData,
    ServerMessage,
    StateChangeMsg,
    VideoInfo,
    pcm_from_bytes,
)
from ..session import OutputFrame, Session
from ..units import ID_RE
from ..wire import (
    b64,
    check_envelope,
    error_message,
    event_message,
    frame_message,
    validation_error,
)

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 256
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013


class _Overflow(Exception):
    """The client is so far behind that even control events pile up."""


class WebSocketSink:
    """Bounded outbox for one connection: drop-oldest for frames, never for events.

    Plain idle-loop frames are served from the shared pre-encoded loop (``loops``) when it is
    ready: entered at one of its IDRs, left by forcing an IDR on the live encoder, and left
    too whenever a frame is missing (dropped for a slow reader), so every packet sent still
    decodes in order.
    """

    def __init__(self, session: Session, max_frames: int, loops: LoopCache | None = None) -> None:
        self.session = session
        self.max_frames = max_frames
        self.loops = loops
        self._copying: tuple[LoopKey, int] | None = None  # (loop, last position sent)
        self._items: deque[OutputFrame | ServerMessage] = deque()
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

    def request_keyframe(self) -> None:
        if self.encoder is not None:
            self.encoder.request_keyframe()

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

    def on_event(self, event: SessionEvent | ServiceError | ServerMessage) -> None:
        if not isinstance(event, ServerMessage):
            event = event_message(self.session.session_id, event, self.session.avatar.names)
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
                if item.type == "ERROR":
                    self.session.stats.errors_sent += 1
                await ws.send_text(item.to_json())

    def _from_loop(self, f: OutputFrame) -> tuple[str, bool] | None:
        """The shared loop's packet for ``f`` when it may be copied (base64, keyframe)."""
        if self.loops is None or f.loop_pos is None:
            return None
        s, v = self.session, self.session.video
        key = LoopKey(s.avatar.avatar_id, f.clip, v.width, v.height, v.fps, v.bitrate,
                      v.gop_frames)
        loop = self.loops.get(key, s.avatar.clip(f.clip).frames)
        if loop is None:
            return None
        p = f.loop_pos % loop.period
        prev = self._copying
        if loop.keyframe[p] or (prev is not None and prev[0] == key
                                and (prev[1] + 1) % loop.period == p):
            self._copying = (key, p)
            return loop.b64[p], loop.keyframe[p]
        return None

    async def _send_frame(self, ws: WebSocket, f: OutputFrame) -> None:
        assert self.encoder is not None
        s = self.session
        copied = self._from_loop(f)
        if copied is not None:
            data, keyframe = copied
            s.stats.loop_frames += 1
        else:
            if self._copying is not None:  # back to live: a fresh closed GOP
                self._copying = None
                self.encoder.request_keyframe()
            try:
                enc = await self.encoder.encode(f.image)
            except ProcessingError as err:  # e.g. an encoder process died: the next is a keyframe
                log.warning("session %s: %s", s.session_id, err.message)
                self.on_event(err)
                return
            data, keyframe = b64(enc.data), enc.keyframe
        text = frame_message(s.session_id, f, data, keyframe, s.avatar.names)
        await ws.send_text(text)
        s.stats.frame_sent(f.audio_arrival, f.created, s.clock.now(), len(text))

    async def drain(self, ws: WebSocket, timeout: float = 2.0) -> None:
        """Send the control events still queued (frames are dropped), e.g. before closing."""
        events = [i for i in self._items if isinstance(i, ServerMessage)]
        self._items.clear()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                for ev in events:
                    await ws.send_text(ev.to_json())


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
    async def _send_direct(self, msg: ServerMessage) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            await self.ws.send_text(msg.to_json())

    async def report(self, event: ServiceError | SessionEvent | ServerMessage) -> None:
        """Send in order with the frames once streaming, directly before."""
        if self.sink is not None:
            self.sink.on_event(event)
        elif isinstance(event, ServerMessage):
            await self._send_direct(event)
        else:
            await self._send_direct(event_message(None, event, None))

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
        if not ID_RE.match(self.user_id):
            await self._send_direct(error_message(InvalidMessage(
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
                return  # the client went away: nothing to report, the caller tears down
            try:
                await self._handle(message)
            except ServiceError as err:
                await self.report(err)
                if err.fatal:
                    code = CLOSE_TRY_AGAIN if err.code == "RATE_LIMIT_EXCEEDED" else CLOSE_POLICY
                    await self._close(code, err.code)
                    return
            except Exception:  # a bug must cost one request, not the connection
                log.exception("connection %s: request failed", self.user_id)
                await self.report(InternalError("internal error; the request was dropped"))

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
        except (json.JSONDecodeError, TypeError):
            raise InvalidMessage("message is not valid JSON") from None
        check_envelope(raw)
        try:
            msg = CLIENT_ADAPTER.validate_python(raw)
        except ValidationError as exc:
            raise validation_error(exc, raw) from None
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

    def _chunk(self, session: Session, chunk: Any) -> Any:
        try:
            pcm = chunk.pcm(self.settings.max_chunk_ms)
        except ValueError as exc:
            raise InvalidMessage(str(exc)) from None
        if chunk.mislabelled(len(pcm)):
            session.stats.duration_mismatches += 1  # the bytes are the truth
        return pcm

    async def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, InitMsg):
            await self._init(msg)
            return
        if isinstance(msg, PingMsg):
            now_ms = int(self.services.sessions.clock.now() * 1000)
            sid = self.session.session_id if self.session else None
            await self.report(ServerMessage(type="PONG", session_id=sid,
                                            data=PongData(t=msg.data.t, server_time_ms=now_ms)))
            return
        session = self._require_session(msg.session_id)
        if isinstance(msg, GenerateMsg):
            await self._generate(session, msg)
        elif isinstance(msg, StateChangeMsg):
            session.change_state(msg.data.target_state, msg.data.base_video)
        elif isinstance(msg, ActionMsg):
            await self._action(session, msg)
        elif isinstance(msg, InterruptMsg):
            session.interrupt()
        elif isinstance(msg, EndOfSpeechMsg):
            session.end_of_speech()
        elif isinstance(msg, KeyframeRequestMsg):
            assert self.sink is not None
            self.sink.request_keyframe()
        elif isinstance(msg, CloseMsg):
            await self.report(ClosedByClient())
            await self._close(1000, "closed")

    async def _generate(self, session: Session, msg: GenerateMsg) -> None:
        d = msg.data
        pcm = self._chunk(session, d.audio_chunk)
        if d.video_state is not None and d.video_state.base_video is not None:
            session.set_speech_video(d.video_state.base_video)
        session.push_audio(pcm, d.end_of_speech)

    async def _action(self, session: Session, msg: ActionMsg) -> None:
        d = msg.data
        if d.action_index is not None:  # v1.1: acknowledged, then the clip in the stream
            await self.report(session.start_action(f"action_{d.action_index}"))
            return
        assert d.action_type is not None  # v1.0: the clip's frames come as ACTION_FRAME
        pcm = self._chunk(session, d.audio_chunk) if d.audio_chunk else None
        session.start_action(d.action_type, pcm, legacy=True)

    async def _init(self, msg: InitMsg) -> None:
        if self.session is not None:
            raise InvalidMessage("this connection already has a session",
                                 {"session_id": self.session.session_id})
        d = msg.data
        if d.user_id != self.user_id:
            raise InvalidMessage("INIT user_id does not match the URL's user_id",
                                 {"url_user_id": self.user_id})
        check_token(self.settings.auth_token, d.auth_token)
        if d.video_config.fps is not None and d.video_config.fps != self.settings.fps:
            raise InvalidMessage(f"this server streams at {self.settings.fps} fps",
                                 {"fps": self.settings.fps})
        session_id = msg.session_id or str(uuid.uuid4())
        session = await self.services.sessions.create(session_id, self.user_id, d.video_config)
        self.session = session
        sink = await self._open_sink(session)
        try:
            await self._send_direct(self._init_success(session))
        except BaseException:
            await sink.close()  # frees the encoder's worker slot and shared memory
            raise
        self.sink = sink
        session.add_sink(sink)
        session.start()
        self._sender = asyncio.create_task(self._send_loop(), name=f"ws-send-{session.session_id[:8]}")

    def _init_success(self, session: Session) -> ServerMessage:
        names = session.avatar.names
        info = self.services.engine.info()
        data = InitSuccessData(
            model_loaded=bool(info.get("loaded")), available_videos=names.available(),
            default_video=names.public(session.cursor.base_video), streaming_started=True,
            engine=self.services.engine.name, avatar=session.avatar.avatar_id,
            videos=[VideoInfo(**v) for v in names.describe()],
            video_config=session.video.as_dict(), model_status=info,
            replica_id=self.services.replica_id)
        return ServerMessage(type="INIT_SUCCESS", session_id=session.session_id, data=data)

    async def _open_sink(self, session: Session) -> WebSocketSink:
        sink = WebSocketSink(session, self.settings.send_queue_frames, self.services.loops)
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
