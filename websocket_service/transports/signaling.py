"""WebRTC signaling, both ways: ``POST /offer`` and the WebSocket ``/musetalk/v1/rtc/{user_id}``.

Both end in :meth:`RtcHub.connect`; the answer always carries every server candidate
(aiortc gathers completely before ``setLocalDescription`` returns), so trickle from the
server is never needed. The message set is documented in ``musetalk_websocket_spec.md`` (section 9).

An offer that names a running ``session_id`` attaches a receive-only viewer to that session
instead of opening one (:meth:`RtcHub.view`); its owner keeps control.

With ``AUTH_TOKEN`` set, ``POST /offer`` takes the token as a Bearer header or ``auth_token``
in its body; the signaling socket as ``?token=`` or ``auth_token`` in its first message, which
must then be an offer (browsers cannot set headers on a WebSocket). Until it authenticates the
socket takes no ``MAX_RTC_CLIENTS`` slot: it is one of its address's ``MAX_PENDING_PER_IP``
unauthenticated sockets, and has ``INIT_TIMEOUT_S`` in all to send its offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Annotated, Any, Literal

from aiortc.sdp import candidate_from_sdp
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocketState

from ..api.access import check_user, owned_session, viewable_session
from ..api.auth import (
    OPERATOR,
    UNAUTHORIZED,
    Credentials,
    Principal,
    auth_required,
    authorize,
    bearer_token,
    origin_allowed,
)
from ..errors import AuthFailed, InvalidMessage, InvalidSession, RateLimitExceeded, ServiceError
from ..limits import Pending
from ..protocol import VideoConfig
from ..units import ID_PATTERN, ID_RE
from ..wire import signaling_error
from .webrtc import RtcHub, RtcPeer

log = logging.getLogger(__name__)

router = APIRouter(tags=["webrtc"])
IDLE_TIMEOUT_S = 60.0  # a signaling socket with no message (not even a ping) this long is closed
MAX_OUTBOX = 256
MAX_SIGNAL_BYTES = 64 * 1024
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013

ID = Field(None, pattern=ID_PATTERN)
TOKEN = Field(None, max_length=1024, description="the server's AUTH_TOKEN, when one is set")
VIEW = Field(None, pattern=ID_PATTERN,
             description="view this running session (receive-only) instead of opening one")


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class OfferRequest(_Msg):
    """Body of ``POST /offer`` (the aiortc examples' convention plus who is asking)."""

    sdp: str = Field(..., max_length=MAX_SIGNAL_BYTES)
    type: Literal["offer"] = "offer"
    user_id: str | None = Field(None, pattern=ID_PATTERN,
                                description="who opens a new session (required unless session_id)")
    session_id: str | None = VIEW
    avatar_id: str | None = ID
    base_video: str | None = Field(None, max_length=64)
    auth_token: str | None = TOKEN


class OfferAnswer(_Msg):
    sdp: str
    type: Literal["answer"] = "answer"
    session_id: str
    viewer: bool = False


class SigOffer(_Msg):
    type: Literal["offer"]
    sdp: str = Field(..., max_length=MAX_SIGNAL_BYTES)
    session_id: str | None = VIEW
    avatar_id: str | None = ID
    base_video: str | None = Field(None, max_length=64)
    auth_token: str | None = TOKEN


class SigCandidate(_Msg):
    type: Literal["ice-candidate"]
    candidate: dict[str, Any] | None = None  # RTCIceCandidateInit; null = end of candidates


class SigPing(_Msg):
    type: Literal["ping"]
    t: float | None = None


class SigBye(_Msg):
    type: Literal["bye"]


SIGNAL_ADAPTER: TypeAdapter[Any] = TypeAdapter(
    Annotated[SigOffer | SigCandidate | SigPing | SigBye, Field(discriminator="type")])


def _hub(app: Any) -> RtcHub:
    return app.state.rtc_hub


@router.post("/offer", response_model=OfferAnswer, responses=UNAUTHORIZED)
async def offer(request: Request, body: OfferRequest, credentials: Credentials) -> OfferAnswer:
    """Answer a WebRTC offer with a new session. Poll ``GET /sessions/{session_id}``
    (``rtc.connection_state``) to learn about failures; the session closes with the peer.
    With ``session_id``, attach a receive-only viewer to that running session instead
    (404 ``INVALID_SESSION`` if there is none; with a JWT, 403 ``AUTH_FAILED`` for a session
    that is not its user's, unless ``auth_token`` is the session's view grant); it is
    disconnected when the session closes.
    With ``AUTH_TOKEN`` set, send it as a Bearer header or as ``auth_token`` in the body."""
    hub = _hub(request.app)
    tokens = (bearer_token(credentials), body.auth_token)
    client_ip = request.client.host if request.client else None
    if body.session_id is not None:  # a viewer: the session's owner, or a view grant
        viewable_session(hub.settings, hub.services.sessions, body.session_id, body.user_id,
                         *tokens)
        peer = await hub.view(body.session_id, body.sdp, body.type, client_ip)
    elif body.user_id is None:
        authorize(hub.settings, None, *tokens)
        raise InvalidMessage("send user_id to open a session, or session_id to view one")
    else:
        authorize(hub.settings, body.user_id, *tokens)  # a JWT: its subject is user_id
        peer = await hub.connect(
            body.user_id, body.sdp, body.type,
            VideoConfig(avatar_id=body.avatar_id, base_video=body.base_video))
    desc = peer.pc.localDescription
    return OfferAnswer(sdp=desc.sdp, type="answer", session_id=peer.session_id,
                       viewer=peer.viewer)


class SignalingConnection:
    """One signaling socket: at most one peer at a time, one client slot once authenticated."""

    def __init__(self, ws: WebSocket, hub: RtcHub, user_id: str) -> None:
        self.ws = ws
        self.hub = hub
        self.user_id = user_id
        self.key = f"sig-{uuid.uuid4()}"
        self.peer: RtcPeer | None = None
        self.authed = not auth_required(hub.settings)
        #: who the socket acts for; None while unauthenticated, or when it holds only a view
        #: grant (it may then watch that session, nothing else)
        self.principal: Principal | None = OPERATOR if self.authed else None
        self.close_code = 1000
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(MAX_OUTBOX)
        #: until authenticated: one of its address's pending sockets, and no client slot
        self._pending: Pending | None = None
        self._overflow = False

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a message without blocking; a client that stops reading is dropped."""
        try:
            self.outbox.put_nowait(msg)
        except asyncio.QueueFull:
            self._overflow = True

    async def _send_loop(self) -> None:
        while not self._overflow:
            msg = await self.outbox.get()
            if msg is None:  # end marker from _flush
                return
            await self.ws.send_text(json.dumps(msg))

    async def run(self) -> None:
        if not ID_RE.match(self.user_id):
            await self._refuse(InvalidMessage("user_id must be 1-64 characters of letters, "
                                              "digits, '-' and '_'"), CLOSE_POLICY)
            return
        url_token = self.ws.query_params.get("token")
        if url_token is not None and not self.authed:
            try:
                self.principal = authorize(self.hub.settings, self.user_id, url_token)
            except AuthFailed as err:
                await self._refuse(err, CLOSE_POLICY)
                return
            self.authed = True
        try:
            if self.authed:
                self.hub.reserve(self.key)
            else:
                self._pending = self.hub.services.pending.enter(
                    self.ws.client.host if self.ws.client else None)
        except RateLimitExceeded as err:
            await self._refuse(err, CLOSE_TRY_AGAIN, None if self.authed else
                               "too many unauthenticated connections from this address")
            return
        sender = asyncio.create_task(self._send_loop(), name=f"sig-send-{self.user_id}")
        receiver = asyncio.create_task(self._receive_loop(), name=f"sig-recv-{self.user_id}")
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver
            await self._drop_peer("signaling closed")
            await self._flush(sender)
            self.hub.release(self.key)
            if self._pending is not None:
                self._pending.done()
            if self.ws.application_state is WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await self.ws.close(self.close_code)

    async def _flush(self, sender: asyncio.Task[None]) -> None:
        """Let the sender deliver what is queued (e.g. 'disconnected'), then stop it."""
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait({sender}, timeout=1.0)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender

    async def _refuse(self, err: ServiceError, code: int, reason: str | None = None) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send_text(json.dumps(signaling_error(err)))
            await self.ws.close(code, reason or err.code)

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # an unauthenticated socket gets INIT's time in all to send its offer, so that one
        # without the token cannot hold a client slot by sending anything else
        auth_deadline = loop.time() + self.hub.settings.init_timeout_s
        while True:
            wait = IDLE_TIMEOUT_S if self.authed else max(0.0, auth_deadline - loop.time())
            try:
                async with asyncio.timeout(wait):
                    text = await self.ws.receive_text()
            except TimeoutError:
                if not self.authed:
                    self._fail(AuthFailed("no authenticated offer within "
                                          f"{self.hub.settings.init_timeout_s:g} s"))
                    return
                self.send(signaling_error(InvalidSession(f"no message for {IDLE_TIMEOUT_S:g} s; send "
                                                "'ping' to keep the connection", fatal=True)))
                return
            except (WebSocketDisconnect, RuntimeError, KeyError):
                return
            try:
                await self._handle(text)
            except ServiceError as err:
                self._fail(err)
                if err.fatal:
                    return

    def _fail(self, err: ServiceError) -> None:
        self.send(signaling_error(err))
        if isinstance(err, AuthFailed):
            self.close_code = CLOSE_POLICY
        elif isinstance(err, RateLimitExceeded) and err.fatal:
            self.close_code = CLOSE_TRY_AGAIN

    async def _handle(self, text: str) -> None:
        if len(text) > MAX_SIGNAL_BYTES:
            raise InvalidMessage(f"signaling message over {MAX_SIGNAL_BYTES} bytes")
        try:
            msg = SIGNAL_ADAPTER.validate_json(text)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise InvalidMessage(f"invalid signaling message: {first.get('msg')}",
                                 {"expected_types": ["offer", "ice-candidate", "ping", "bye"]}) from None
        if not self.authed:
            if not isinstance(msg, SigOffer):
                raise AuthFailed("send the auth token as ?token= or in the first message, an offer")
            if not (msg.session_id is not None and self.hub.services.sessions.view_granted(
                    msg.session_id, msg.auth_token)):
                self.principal = authorize(self.hub.settings, self.user_id, msg.auth_token)
            self.authed = True
            self._admit()
        if isinstance(msg, SigPing):
            loop = asyncio.get_running_loop()
            self.send({"type": "pong", "t": msg.t, "server_time_ms": int(loop.time() * 1000)})
        elif isinstance(msg, SigOffer):
            await self._offer(msg)
        elif isinstance(msg, SigCandidate):
            await self._candidate(msg)
        elif isinstance(msg, SigBye):
            await self._drop_peer("client said bye")

    def _admit(self) -> None:
        """Authenticated: no longer pending, it now takes a client slot (none free: a fatal
        RATE_LIMIT_EXCEEDED, close 1013)."""
        if self._pending is not None:
            self._pending.done()
        self.hub.reserve(self.key)

    async def _offer(self, msg: SigOffer) -> None:
        await self._drop_peer("renegotiated with a new offer")
        mgr = self.hub.services.sessions
        if msg.session_id is not None:
            if not mgr.view_granted(msg.session_id, msg.auth_token):
                owned_session(mgr, self._principal(), msg.session_id)
            self.peer = await self.hub.view(msg.session_id, msg.sdp, "offer", self._client_ip(),
                                            notify=self.send, slot=self.key)
        else:
            check_user(self._principal(), self.user_id)
            self.peer = await self.hub.connect(
                self.user_id, msg.sdp, "offer",
                VideoConfig(avatar_id=msg.avatar_id, base_video=msg.base_video),
                notify=self.send, slot=self.key)
        desc = self.peer.pc.localDescription
        self.send({"type": "answer", "sdp": desc.sdp, "session_id": self.peer.session_id,
                   "viewer": self.peer.viewer})

    def _principal(self) -> Principal:
        if self.principal is None:
            raise AuthFailed("a view grant only lets this socket watch its session")
        return self.principal

    def _client_ip(self) -> str | None:
        return self.ws.client.host if self.ws.client else None

    async def _candidate(self, msg: SigCandidate) -> None:
        if self.peer is None:
            raise InvalidSession("send an offer before ICE candidates")
        c = msg.candidate
        if not c or not c.get("candidate"):
            return  # end of candidates: nothing to do for aioice
        try:
            cand = candidate_from_sdp(str(c["candidate"]).removeprefix("candidate:"))
        except (ValueError, IndexError) as exc:
            raise InvalidMessage(f"cannot parse ICE candidate: {exc}") from None
        cand.sdpMid = c.get("sdpMid")
        cand.sdpMLineIndex = c.get("sdpMLineIndex")
        await self.peer.pc.addIceCandidate(cand)

    async def _drop_peer(self, reason: str) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            await peer.close(reason)


async def signaling_endpoint(ws: WebSocket, user_id: str) -> None:
    if not origin_allowed(_hub(ws.app).settings, ws):
        await ws.close(code=CLOSE_POLICY)  # before accept: the handshake fails with 403
        return
    await ws.accept()
    await SignalingConnection(ws, _hub(ws.app), user_id).run()


def install(app: Any) -> None:
    """Mount the WebRTC signaling on ``app``; peers are closed before the sessions at shutdown."""

    async def start(app: Any) -> None:
        app.state.rtc_hub = RtcHub(app.state.services)

    async def stop(app: Any) -> None:
        await app.state.rtc_hub.close_all()

    app.state.startup_hooks.append(start)
    app.state.shutdown_hooks.append(stop)
    app.include_router(router)
    app.add_api_websocket_route("/musetalk/v1/rtc/{user_id}", signaling_endpoint)
