"""The WebSocket transport: parse client messages, move the session's output to the socket.

A client's frames pass the connection's :class:`~.ws_intake.Intake` (rate and size limits,
then message models) and one table, :attr:`Connection.ROUTES`: each message type (binary
audio included) to who may send it (anyone, the session's connections, its owner only) and
the handler that calls the session. It never touches an engine. The session's frames are encoded once in its
:class:`~websocket_service.feed.SessionFeed` (off the event loop: in the encoder process pool, or in a thread
with ``encoder_processes=0``) and the same messages go to the owner's connection and to every
viewer's (``INIT.data.viewer``), each through its own bounded :class:`~websocket_service.feed.Outbox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from ..api.access import viewable_session
from ..api.auth import authorize, origin_allowed
from ..errors import (
    CLOSE_POLICY,
    InternalError,
    InvalidMessage,
    InvalidSession,
    RateLimitExceeded,
    ServiceError,
)
from ..events import ClosedByClient, SessionEvent
from ..feed import Outbox, Overflow, SessionFeed, ensure_feed, release_feed
from ..limits import Pending
from ..manager import Services
from ..protocol import (
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
from ..session import Session
from ..units import ID_RE
from ..wire import (
    error_message,
    event_message,
)
from .bridge_ws import bridge_endpoint
from .mic_out import mic_endpoint
from .ws_intake import AudioBytes, Intake

log = logging.getLogger(__name__)


class Access(Enum):
    """Who may send a client message."""

    ANYONE = "anyone"  # with or without a session (INIT, PING)
    SESSION = "session"  # on the connection's session, owner or viewer
    OWNER = "owner"  # the session's owner only: it controls the session


@dataclass(frozen=True)
class Route:
    """Where a client message goes: who may send it, and the :class:`Connection` method that
    handles it (called with the connection, the message, and the connection's session)."""

    access: Access
    handler: Callable[[Connection, Any, Any], Awaitable[None]]


class Connection:
    """One client connection; at most one session on it."""

    def __init__(self, ws: WebSocket, services: Services, user_id: str) -> None:
        self.ws = ws
        self.services = services
        self.settings = services.settings
        self.user_id = user_id
        self.session: Session | None = None
        self.outbox: Outbox | None = None
        self.feed: SessionFeed | None = None
        self.viewer = False  # receive-only: a viewer of someone else's session
        self._viewer_key: str | None = None  # its place in the viewer limits
        self._sender: asyncio.Task[None] | None = None
        self._recv: asyncio.Task[None]
        self._closing = False
        self._not_reading = False  # its events piled up past their bound: close it
        self.intake = Intake(self.settings, services.sessions.clock, services.sessions.metrics)
        self._pending: Pending | None = None  # until INIT succeeds: the per-address bound

    # ---------------------------------------------------------------- sending
    async def _send_direct(self, msg: ServerMessage) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            await self.ws.send_text(msg.to_json())

    async def report(self, event: ServiceError | SessionEvent | ServerMessage) -> None:
        """A reply to this connection: in order with its frames once streaming, directly before."""
        if not isinstance(event, ServerMessage):
            s = self.session
            event = event_message(s.session_id if s else None, event, s.avatar.names if s else None)
        if self.outbox is not None:
            self.outbox.event(event)
        else:
            await self._send_direct(event)

    async def _close(self, code: int, reason: str) -> None:
        self._closing = True
        if self._sender is not None:  # one writer at a time: stop the sender, then drain
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        if self.outbox is not None:
            await self.outbox.drain(self.ws)
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
        try:
            pending = self._pending = self.services.pending.enter(
                self.ws.client.host if self.ws.client else None)
        except RateLimitExceeded as err:
            await self._send_direct(error_message(err, None))
            await self._close(err.close_code, "too many unauthenticated connections from "
                                               "this address")
            return
        self._recv = asyncio.create_task(self._receive_loop(), name=f"ws-recv-{self.user_id}")
        try:
            # the sender cancels the receive task if the client stops reading
            await asyncio.wait({self._recv})
            if self._not_reading:
                log.warning("session %s: client not reading; closing",
                            self.session.session_id if self.session else "-")
                await self._close(CLOSE_POLICY, "client not reading")
            if not self._recv.cancelled():
                exc = self._recv.exception()
                if exc is not None and not isinstance(exc, WebSocketDisconnect):
                    log.error("connection %s failed", self.user_id, exc_info=exc)
        finally:
            pending.done()
            self._recv.cancel()
            try:
                await self._teardown()
            finally:
                # a cancelled task keeps its CancelledError, whose traceback holds our frames:
                # drop the tasks so that this connection is freed by reference counting
                del self._recv
                self._sender = None

    async def _receive_loop(self) -> None:
        # INIT's time counts from the connection, not from the last message: a client that
        # sends anything else does not stay unauthenticated longer
        init_deadline = self.services.sessions.clock.now() + self.settings.init_timeout_s
        while not self._closing:
            if self.outbox is not None:
                try:  # replies pile up: wait for the client to read them
                    await self.outbox.make_room(self._backlog, self.settings.send_stall_s)
                except Overflow:
                    log.warning("session %s: client not reading; closing",
                                self.session.session_id if self.session else "-")
                    await self._close(CLOSE_POLICY, "client not reading")
                    return
            try:
                message = await self._receive(init_deadline)
            except TimeoutError:
                await self.report(InvalidSession(
                    f"no INIT within {self.settings.init_timeout_s:g} s", fatal=True))
                await self._close(CLOSE_POLICY, "INIT timeout")
                return
            if message is None:
                continue  # the dropped messages' report was due
            if message["type"] == "websocket.disconnect":
                return  # the client went away: nothing to report, the caller tears down
            try:
                if (msg := self.intake.parse(message)) is not None:
                    await self._dispatch(msg)
            except ServiceError as err:
                await self.report(err)
                if err.fatal:
                    await self._close(err.close_code, err.code)
                    return
            except Exception:  # a bug must cost one request, not the connection
                log.exception("connection %s: request failed", self.user_id)
                await self.report(InternalError("internal error; the request was dropped"))

    def _backlog(self) -> int:
        """Events waiting for this client: in its outbox, and on their way in the feed."""
        assert self.outbox is not None
        return self.outbox.pending_events + (self.feed.pending_events if self.feed else 0)

    async def _receive(self, init_deadline: float) -> Mapping[str, Any] | None:
        """The next client message; None when instead the report of dropped messages fell
        due (and was sent). TimeoutError: no INIT by ``init_deadline``."""
        clock = self.services.sessions.clock
        due = [] if self.session else [init_deadline]
        if (report_at := self.intake.report_due_at()) is not None:
            due.append(report_at)
        try:
            async with asyncio.timeout(min(due) - clock.now() if due else None):
                return await self.ws.receive()
        except TimeoutError:
            if (report := self.intake.drop_report()) is not None:
                await self.report(report)
                return None
            if self.session is None and clock.now() >= init_deadline:
                raise
            return None

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
            session.stats.duration_mismatch()  # the bytes are the truth
        return pcm

    async def _dispatch(self, msg: Any) -> None:
        """Hand a parsed message to its handler in :attr:`ROUTES`, once this connection may
        send it: anyone, or on its session (``session_id``, when given, must be it), or only
        as the session's owner (a viewer is receive-only)."""
        route = self.ROUTES[type(msg)]
        if route.access is Access.ANYONE:
            await route.handler(self, msg, self.session)
            return
        session = self._require_session(msg.session_id)
        if route.access is Access.OWNER and self.viewer:
            raise InvalidSession("a viewer is receive-only: the session's owner controls it",
                                 {"session_id": session.session_id, "type": msg.type})
        await route.handler(self, msg, session)

    # ---------------------------------------------------------------- handlers (ROUTES)
    async def _on_init(self, msg: InitMsg, session: Session | None) -> None:
        await (self._view(msg) if msg.data.viewer else self._init(msg))

    async def _on_ping(self, msg: PingMsg, session: Session | None) -> None:
        now_ms = int(self.services.sessions.clock.now() * 1000)
        sid = session.session_id if session else None
        await self.report(ServerMessage(type="PONG", session_id=sid,
                                        data=PongData(t=msg.data.t, server_time_ms=now_ms)))

    async def _on_close(self, msg: CloseMsg, session: Session) -> None:
        await self.report(ClosedByClient())
        await self._close(1000, "closed")

    async def _on_keyframe_request(self, msg: KeyframeRequestMsg, session: Session) -> None:
        assert self.feed is not None
        self.feed.request_keyframe()

    async def _on_audio_bytes(self, msg: AudioBytes, session: Session) -> None:
        try:
            pcm = pcm_from_bytes(msg.data, self.settings.max_chunk_ms)
        except ValueError as exc:
            raise InvalidMessage(str(exc)) from None
        session.push_audio(pcm)

    async def _on_generate(self, msg: GenerateMsg, session: Session) -> None:
        d = msg.data
        pcm = self._chunk(session, d.audio_chunk)
        if d.video_state is not None and d.video_state.base_video is not None:
            session.set_speech_video(d.video_state.base_video)
        session.push_audio(pcm, d.end_of_speech)

    async def _on_state_change(self, msg: StateChangeMsg, session: Session) -> None:
        session.change_state(msg.data.target_state, msg.data.base_video)

    async def _on_action(self, msg: ActionMsg, session: Session) -> None:
        d = msg.data
        if d.action_index is not None:  # v1.1: acknowledged, then the clip in the stream
            await self.report(session.start_action(f"action_{d.action_index}"))
            return
        assert d.action_type is not None  # v1.0: the clip's frames come as ACTION_FRAME
        pcm = self._chunk(session, d.audio_chunk) if d.audio_chunk else None
        session.start_action(d.action_type, pcm, legacy=True)

    async def _on_interrupt(self, msg: InterruptMsg, session: Session) -> None:
        session.interrupt()

    async def _on_end_of_speech(self, msg: EndOfSpeechMsg, session: Session) -> None:
        session.end_of_speech()

    #: every client message (and binary audio): who may send it, and its handler
    ROUTES: ClassVar[dict[type[Any], Route]] = {
        InitMsg: Route(Access.ANYONE, _on_init),
        PingMsg: Route(Access.ANYONE, _on_ping),
        CloseMsg: Route(Access.SESSION, _on_close),
        KeyframeRequestMsg: Route(Access.SESSION, _on_keyframe_request),
        AudioBytes: Route(Access.OWNER, _on_audio_bytes),
        GenerateMsg: Route(Access.OWNER, _on_generate),
        StateChangeMsg: Route(Access.OWNER, _on_state_change),
        ActionMsg: Route(Access.OWNER, _on_action),
        InterruptMsg: Route(Access.OWNER, _on_interrupt),
        EndOfSpeechMsg: Route(Access.OWNER, _on_end_of_speech),
    }

    def _check_init(self, msg: InitMsg) -> None:
        """What INIT must satisfy, owner or viewer (a viewer's token is checked in _view)."""
        if self.session is not None:
            raise InvalidMessage("this connection already has a session",
                                 {"session_id": self.session.session_id})
        d = msg.data
        if d.user_id != self.user_id:
            raise InvalidMessage("INIT user_id does not match the URL's user_id",
                                 {"url_user_id": self.user_id})
        if not d.viewer:
            authorize(self.settings, self.user_id, d.auth_token)
        if d.video_config.fps is not None and d.video_config.fps != self.settings.fps:
            raise InvalidMessage(f"this server streams at {self.settings.fps} fps",
                                 {"fps": self.settings.fps})

    async def _init(self, msg: InitMsg) -> None:
        """A new session, owned by this connection."""
        self._check_init(msg)
        session_id = msg.session_id or str(uuid.uuid4())
        session = await self.services.sessions.create(session_id, self.user_id,
                                                      msg.data.video_config,
                                                      client_ip=self._client_ip())
        self.session = session
        self.feed = await ensure_feed(self.services, session)
        await self._attach(session, self.feed)
        session.start()

    async def _view(self, msg: InitMsg) -> None:
        """Receive-only, on an existing session (its owner's feed, or a new one)."""
        self._check_init(msg)
        if msg.session_id is None:
            raise InvalidMessage("a viewer names the session it views in session_id")
        mgr = self.services.sessions
        # its owner, or a holder of its view grant
        session = viewable_session(self.settings, mgr, msg.session_id, self.user_id,
                                   msg.data.auth_token)
        self._viewer_key = mgr.admit_viewer(session.session_id, self._client_ip())
        # e.g. a server-side session has no feed until someone watches it
        feed = await ensure_feed(self.services, session)
        self.session, self.feed, self.viewer = session, feed, True
        await self._attach(session, feed)

    def _client_ip(self) -> str | None:
        return self.ws.client.host if self.ws.client else None

    async def _attach(self, session: Session, feed: SessionFeed) -> None:
        if self._pending is not None:
            self._pending.done()  # authenticated: no longer counted as pending
        await self._send_direct(self._init_success(session))
        self.outbox = Outbox(session, self.settings.send_queue_frames)
        self.outbox.on_overflow = self._overflowed
        feed.subscribe(self.outbox)
        self._sender = asyncio.create_task(self._send_loop(), name=f"ws-send-{session.session_id[:8]}")

    def _overflowed(self) -> None:
        """Events pile up past their bound (e.g. a viewer that sends nothing and reads nothing
        while its session's owner is busy): stop; :meth:`run` closes the socket."""
        self._not_reading = True
        self._recv.cancel()

    def _init_success(self, session: Session) -> ServerMessage:
        names = session.avatar.names
        info = self.services.engine.info()
        data = InitSuccessData(
            model_loaded=bool(info.get("loaded")), available_videos=names.available(),
            default_video=names.public(session.cursor.base_video), streaming_started=True,
            engine=self.services.engine.name, avatar=session.avatar.avatar_id,
            videos=[VideoInfo(**v) for v in names.describe()],
            video_config=session.video.as_dict(), model_status=info,
            replica_id=self.services.replica_id, viewer=self.viewer or None)
        return ServerMessage(type="INIT_SUCCESS", session_id=session.session_id, data=data)

    async def _send_loop(self) -> None:
        assert self.outbox is not None
        try:
            await self.outbox.run(self.ws)
        except Overflow:
            log.warning("session %s: client not reading; closing",
                        self.session.session_id if self.session else "-")
            self._closing = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.ws.close(code=CLOSE_POLICY, reason="client not reading")
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._closing = True  # the socket went away
        else:  # the session ended (a viewer's CLOSE_ACK is out): close the socket
            self._closing = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.ws.close(code=1000, reason="session closed")
        self._recv.cancel()

    async def _teardown(self) -> None:
        self.services.sessions.release_viewer(self._viewer_key)
        if self.outbox is not None:
            self.outbox.on_overflow = None  # a bound method of ours: no cycle outlives us
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        session, feed = self.session, self.feed
        if feed is not None and self.outbox is not None:
            feed.unsubscribe(self.outbox)
        if session is None:
            return
        if not self.viewer:  # the owner's socket is the session: it ends with it
            await self.services.sessions.close(session.session_id)
            return
        if feed is not None:
            await release_feed(self.services, feed)


async def websocket_endpoint(ws: WebSocket, user_id: str) -> None:
    services: Services = ws.app.state.services
    if not origin_allowed(services.settings, ws):
        await ws.close(code=CLOSE_POLICY)  # before accept: the handshake fails with 403
        return
    await ws.accept()
    await Connection(ws, services, user_id).run()


def install(app: Any) -> None:
    """The protocol's route, the microphone-out and the media-bridge sockets."""
    app.add_api_websocket_route("/musetalk/v1/ws/{user_id}", websocket_endpoint)
    app.add_api_websocket_route("/musetalk/v1/mic/{session_id}", mic_endpoint)
    app.add_api_websocket_route("/musetalk/v1/bridge/{session_id}", bridge_endpoint)
