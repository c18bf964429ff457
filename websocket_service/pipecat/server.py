"""The bot served over SmallWebRTC: its own FastAPI app and browser client, no cloud.

Routes (what ``pipecat-ai-small-webrtc-prebuilt`` calls, as pipecat's development runner):

* ``GET /`` redirects to ``/client/``, this package's own small client (``static/``: plain
  HTML and JS, nothing fetched from the internet); pipecat's prebuilt UI, which loads Daily's
  call-object bundle from the internet, stays at ``/prebuilt/``;
* ``GET /api/ice-servers``: ``ICE_SERVERS``, for the page's peer connection.

With ``AUTH_TOKEN`` set, the API routes (not the pages) need it, as ``Authorization: Bearer``
or ``?token=``; the bot's page passes on the ``?token=`` it was opened with.
* ``POST /start`` registers a session and returns ``{"sessionId"}``;
* ``POST|PATCH /sessions/{id}/api/offer`` (and ``/api/offer``): the SDP offer and its
  trickled ICE candidates, handled by pipecat's ``SmallWebRTCRequestHandler``.

Every connection gets its own pipeline and :class:`MuseTalkProcessor`; the engine and the
avatar are loaded once and shared. pipecat's video track stamps frames as if they came at
exactly 30 fps, but they come slower and unevenly (at 25 fps its timestamps ran 16 % slow);
:class:`PacedVideoTrack` sends a steady 30 fps on absolute deadlines, stamped by that
schedule, so video and audio stay on one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import IceServer, SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    IceCandidate,
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from ..clock import Clock
from ..config import Settings
from ..pacing import Pacer
from ..transports.rtc_network import host_addresses
from .pipeline import (
    VIDEO_OUT_FPS,
    avatar_service,
    build_worker,
    check,
    load_services,
    transport_params,
)
from .processor import MuseTalkProcessor
from .service import AvatarService

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
CLIENT_DIR = Path(__file__).resolve().parent / "static"
MAX_PENDING_SESSIONS = 100


class PacedVideoTrack(MediaStreamTrack):
    """Another video track's newest frame at a steady ``fps``, on absolute deadlines.

    A background task keeps reading the source (pipecat redraws its current picture with
    ``asyncio.sleep`` between frames, so it runs a little slow and jitters); ``recv`` hands
    out the newest frame at ``t0 + n / fps`` (a :class:`~..pacing.Pacer` from the first
    frame), stamped ``n / fps``, repeating a frame when no new one came.
    """

    kind = "video"

    def __init__(self, source: MediaStreamTrack, fps: int = VIDEO_OUT_FPS,
                 clock: Clock | None = None) -> None:
        super().__init__()
        self.source = source
        self.fps = fps
        self.clock = clock or Clock()
        self._latest: av.VideoFrame | None = None
        self._ended = False
        self._fresh = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._pacer = Pacer(self.clock, fps)  # starts at the first frame

    async def _pull(self) -> None:
        try:
            while True:
                frame = await self.source.recv()
                if isinstance(frame, av.VideoFrame):
                    self._latest = frame
                    self._fresh.set()
        except MediaStreamError:
            self._ended = True
            self._fresh.set()

    async def recv(self) -> av.VideoFrame:
        if self._pump is None:
            self._pump = asyncio.create_task(self._pull(), name="paced-video-pull")
            await self._fresh.wait()
        n, _ = await self._pacer.next()
        frame = self._latest
        if self._ended or frame is None or self.readyState != "live":
            raise MediaStreamError
        frame.pts, frame.time_base = n * VIDEO_CLOCK // self.fps, Fraction(1, VIDEO_CLOCK)
        return frame

    def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        self.source.stop()
        super().stop()


def pace_video(connection: SmallWebRTCConnection) -> None:
    """Put a :class:`PacedVideoTrack` in front of the connection's outgoing video."""
    for transceiver in connection.pc.getTransceivers():
        sender = transceiver.sender
        track = sender.track if sender else None
        if transceiver.kind == "video" and track is not None \
                and not isinstance(track, PacedVideoTrack):
            sender.replaceTrack(PacedVideoTrack(track))


class AvatarBots:
    """One shared engine and avatar; one pipeline per WebRTC connection."""

    def __init__(self, config: Settings, services: str | None = None) -> None:
        self.config = config
        self.services = services
        self.shared = MuseTalkProcessor(config=config)  # loads the engine and avatar once
        #: the avatar processor of each live connection, by peer connection id
        self.active: dict[str, AvatarService] = {}
        ice = [IceServer(**s) for s in config.ice_servers]
        self.handler = SmallWebRTCRequestHandler(ice_servers=ice or None)
        self.runner: WorkerRunner | None = None  # made in start(), on the serving loop
        self.sessions: dict[str, dict[str, Any]] = {}
        self._run: asyncio.Task[None] | None = None

    async def start(self, load: bool = True) -> None:
        if load:

            avatar = avatar_service(self.config, self.shared)
            local = isinstance(avatar, MuseTalkProcessor)
            await asyncio.to_thread(check, self.shared if local else avatar, self.config)
        self.runner = WorkerRunner(handle_sigint=False)
        self._run = asyncio.create_task(self.runner.run(auto_end=False), name="pipecat-runner")

    async def stop(self) -> None:
        await self.handler.close()
        if self.runner is not None:
            await self.runner.cancel()
        if self._run is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._run

    def new_session(self, body: dict[str, Any]) -> str:
        while len(self.sessions) >= MAX_PENDING_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        session_id = str(uuid.uuid4())
        self.sessions[session_id] = body
        return session_id

    async def offer(self, request: SmallWebRTCRequest) -> dict[str, str] | None:
        if request.pc_id is None and len(self.active) >= self.config.max_rtc_clients:
            raise HTTPException(429, f"the bot is at its limit of {self.config.max_rtc_clients} "
                                     "connections (MAX_RTC_CLIENTS); try again later")
        with host_addresses(self.config.rtc_host_addresses or None):
            return await self.handler.handle_web_request(request, self._connect)

    async def _connect(self, connection: SmallWebRTCConnection) -> None:
        processor = avatar_service(self.config, self.shared)
        if isinstance(processor, MuseTalkProcessor):  # loaded once, shared by all connections
            avatar = await asyncio.to_thread(self.shared.initialize_avatars)
            processor.engine, processor.avatar = self.shared.engine, avatar
            size = (avatar.width, avatar.height)
        else:
            size = (self.config.default_width, self.config.default_height)
        transport = SmallWebRTCTransport(connection, transport_params(TransportParams, *size))
        worker = build_worker(transport, processor, load_services(self.services))

        @transport.event_handler("on_client_connected")
        async def _connected(_transport: Any, conn: SmallWebRTCConnection) -> None:
            pace_video(conn)

        @transport.event_handler("on_client_disconnected")
        async def _disconnected(_transport: Any, conn: SmallWebRTCConnection) -> None:
            self.active.pop(conn.pc_id, None)
            await worker.cancel()

        self.active[connection.pc_id] = processor
        assert self.runner is not None, "start() first"
        await self.runner.add_workers(worker)


def create_bot_app(config: Settings | None = None, services: str | None = None,
                   load: bool = True) -> FastAPI:
    """The bot's app; ``load=False`` defers loading the engine and avatar to the first call."""
    bots = AvatarBots(config or Settings(), services)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bots.start(load)
        try:
            yield
        finally:
            await bots.stop()

    app = FastAPI(title="MuseTalk avatar bot (pipecat, SmallWebRTC)", lifespan=lifespan)
    app.state.bots = bots
    _routes(app, bots)
    _mount_ui(app)
    return app


def _token_check(bots: AvatarBots) -> Any:
    async def check_token(request: Request) -> None:
        token = bots.config.auth_token
        if not token:
            return
        bearer = request.headers.get("authorization", "")
        given = bearer[7:] if bearer[:7].lower() == "bearer " else request.query_params.get(
            "token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "this bot needs its AUTH_TOKEN: Authorization: Bearer or "
                                     "?token=", headers={"WWW-Authenticate": "Bearer"})
    return Depends(check_token)


def _routes(app: FastAPI, bots: AvatarBots) -> None:
    authorized = [_token_check(bots)]

    @app.post("/start", dependencies=authorized)
    async def start(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        return {"sessionId": bots.new_session(body.get("body") or {})}

    async def offer(request: Request, session_id: str | None = None) -> dict[str, str] | None:
        data = await request.json()
        if request.method == "PATCH":
            await bots.handler.handle_patch_request(SmallWebRTCPatchRequest(
                pc_id=data["pc_id"], candidates=[IceCandidate(**c) for c in data.get("candidates", [])]))
            return {"status": "success"}
        if session_id is not None and session_id not in bots.sessions:
            raise HTTPException(404, "unknown session; POST /start first")
        return await bots.offer(SmallWebRTCRequest.from_dict(
            {k: v for k, v in data.items() if k in ("sdp", "type", "pc_id", "restart_pc",
                                                     "request_data", "requestData")}))

    @app.api_route("/api/offer", methods=["POST", "PATCH"], dependencies=authorized)
    async def direct_offer(request: Request) -> dict[str, str] | None:
        return await offer(request)

    @app.api_route("/sessions/{session_id}/api/offer", methods=["POST", "PATCH"],
                   dependencies=authorized)
    async def session_offer(session_id: str, request: Request) -> dict[str, str] | None:
        return await offer(request, session_id)

    @app.get("/api/ice-servers", dependencies=authorized)
    async def ice_servers() -> dict[str, Any]:
        """The page's ICE servers: the bot's own (``ICE_SERVERS``), e.g. a TURN server."""
        return {"iceServers": bots.config.ice_servers}

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> RedirectResponse:
        query = request.url.query  # e.g. ?token=, for the page
        return RedirectResponse("/client/" + (f"?{query}" if query else ""))


def _mount_ui(app: FastAPI) -> None:
    app.mount("/client", StaticFiles(directory=CLIENT_DIR, html=True), name="client")
    # the module prints where it looks for its files; keep that out of our output
    with contextlib.redirect_stdout(None):
        try:
            from pipecat_ai_small_webrtc_prebuilt.frontend import (  # noqa: PLC0415
                SmallWebRTCPrebuiltUI,
            )
        except ImportError:  # optional: it needs the internet (Daily's bundle) anyway
            return
    app.mount("/prebuilt", SmallWebRTCPrebuiltUI)
