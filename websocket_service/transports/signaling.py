"""WebRTC signaling, both ways: ``POST /offer`` and the WebSocket ``/musetalk/v1/rtc/{user_id}``.

Both end in :meth:`RtcHub.connect`; the answer always carries every server candidate
(aiortc gathers completely before ``setLocalDescription`` returns), so trickle from the
server is never needed. The messages are :mod:`..protocol_rtc`, documented in
``musetalk_websocket_spec.md`` (section 10).

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
import logging
import uuid
from typing import Any

from aiortc.sdp import candidate_from_sdp
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
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
from ..errors import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    AuthFailed,
    InvalidMessage,
    InvalidSession,
    RateLimitExceeded,
    ServiceError,
)
from ..limits import Pending
from ..protocol import VideoConfig
from ..protocol_rtc import (
    MAX_SIGNAL_BYTES,
    SIGNAL_ADAPTER,
    SIGNAL_TYPES,
    Offer,
    OfferAnswer,
    Outgoing,
    SigBye,
    SigCandidate,
    SigPing,
    SigPong,
)
from ..units import ID_RE
from ..wire import explain_invalid, signaling_error
from .webrtc import RtcHub, RtcPeer

log = logging.getLogger(__name__)

router = APIRouter(tags=["webrtc"])
IDLE_TIMEOUT_S = 60.0  # a signaling socket with no message (not even a ping) this long is closed
MAX_OUTBOX = 256

def _hub(app: Any) -> RtcHub:
    return app.state.rtc_hub


@router.post("/offer", response_model=OfferAnswer, responses=UNAUTHORIZED)
async def offer(request: Request, body: Offer, credentials: Credentials) -> OfferAnswer:
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
    return OfferAnswer(sdp=desc.sdp, session_id=peer.session_id, viewer=peer.viewer)


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
        self.close_code = CLOSE_NORMAL
        self.outbox: asyncio.Queue[Outgoing | None] = asyncio.Queue(MAX_OUTBOX)
        #: until authenticated: one of its address's pending sockets, and no client slot
        self._pending: Pending | None = None
        self._overflow = False

    def send(self, msg: Outgoing) -> None:
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
            await self.ws.send_text(msg.to_json())

    async def run(self) -> None:
        if not ID_RE.match(self.user_id):
            await self._refuse(InvalidMessage("user_id must be 1-64 characters of letters, "
                                              "digits, '-' and '_'"))
            return
        url_token = self.ws.query_params.get("token")
        if url_token is not None and not self.authed:
            try:
                self.principal = authorize(self.hub.settings, self.user_id, url_token)
            except AuthFailed as err:
                await self._refuse(err)
                return
            self.authed = True
        try:
            if self.authed:
                self.hub.reserve(self.key)
            else:
                self._pending = self.hub.services.pending.enter(
                    self.ws.client.host if self.ws.client else None)
        except RateLimitExceeded as err:
            await self._refuse(err, None if self.authed else
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

    async def _refuse(self, err: ServiceError, reason: str | None = None) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send_text(signaling_error(err).to_json())
            await self.ws.close(err.close_code, reason or err.code)

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
        if err.fatal:
            self.close_code = err.close_code

    async def _handle(self, text: str) -> None:
        if len(text) > MAX_SIGNAL_BYTES:
            raise InvalidMessage(f"signaling message over {MAX_SIGNAL_BYTES} bytes")
        try:
            msg = SIGNAL_ADAPTER.validate_json(text)
        except ValidationError as exc:
            raise explain_invalid(text, exc, expected_types=SIGNAL_TYPES, envelope=False) from None
        if not self.authed:
            if not isinstance(msg, Offer):
                raise AuthFailed("send the auth token as ?token= or in the first message, an offer")
            if not (msg.session_id is not None and self.hub.services.sessions.view_granted(
                    msg.session_id, msg.auth_token)):
                self.principal = authorize(self.hub.settings, self.user_id, msg.auth_token)
            self.authed = True
            self._admit()
        if isinstance(msg, SigPing):
            loop = asyncio.get_running_loop()
            self.send(SigPong(t=msg.t, server_time_ms=int(loop.time() * 1000)))
        elif isinstance(msg, Offer):
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

    async def _offer(self, msg: Offer) -> None:
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
        self.send(OfferAnswer(sdp=desc.sdp, session_id=self.peer.session_id,
                              viewer=self.peer.viewer))

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
