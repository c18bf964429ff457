"""The process-wide services: engine, avatar store, and the bounded set of live sessions."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import threading
import time
from typing import Any, Protocol

from . import __version__
from .avatars.model import Avatar
from .avatars.store import AvatarStore
from .clock import Clock
from .config import Settings
from .engines import select_engine
from .engines.base import LipSyncEngine
from .errors import InvalidSession, ModelNotFound, RateLimitExceeded
from .limits import PendingLimit
from .logs import session_id_var
from .media.encoder_pool import EncoderPool
from .media.loops import LoopCache, LoopKey
from .metrics import ServiceMetrics
from .pacing import PhaseSpreader
from .protocol import VideoConfig
from .session import Session, VideoSettings
from .units import SAMPLE_RATE

log = logging.getLogger(__name__)


class Attachment(Protocol):
    """Something that lives as long as one session and no longer: a viewer, an audio feeder."""

    async def aclose(self) -> None:
        """Stop; called when the session closes (idempotent)."""


class Placement(Protocol):
    """Tells a cluster's session registry which ids this process holds, so that every request
    naming one is routed here (:mod:`.cluster.registry`); None on one host."""

    async def claim(self, key: str, recording: dict[str, Any] | None = None) -> None:
        """Before the client hears of ``key``: a session id, or a recording's id and its
        description (its owner, for a recording its replica's loss would otherwise lose)."""

    async def release(self, key: str) -> None:
        """The session ``key`` closed, or the recording ``key`` is finished."""


class SessionManager:
    def __init__(self, settings: Settings, engine: LipSyncEngine, store: AvatarStore,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.clock = clock or Clock()
        self.sessions: dict[str, Session] = {}
        self._reserved: set[str] = set()
        self._attached: dict[str, list[Attachment]] = {}
        #: (user_id, client address) of every reserved or live session, for the per-user and
        #: per-address limits
        self._owners: dict[str, tuple[str, str | None]] = {}
        #: view grants: the token that lets its holder watch a session (its owner shares it)
        self._grants: dict[str, str] = {}
        #: every admitted viewer (WebSocket or WebRTC): its session and client address
        self._viewers: dict[str, tuple[str, str | None]] = {}
        self.metrics = ServiceMetrics()
        self.placement: Placement | None = None
        #: sessions opened together tick on different phases of the frame period
        self.phases = PhaseSpreader(settings.fps)

    def _reserve(self, session_id: str, user_id: str, client_ip: str | None) -> None:
        if session_id in self.sessions or session_id in self._reserved:
            raise InvalidSession(f"session {session_id} is already active", {"session_id": session_id})
        if len(self.sessions) + len(self._reserved) >= self.settings.max_sessions:
            raise RateLimitExceeded(
                f"the server is at its limit of {self.settings.max_sessions} sessions; try again later",
                {"max_sessions": self.settings.max_sessions}, fatal=True)
        self._check_owner_limits(user_id, client_ip)
        self._reserved.add(session_id)
        self._owners[session_id] = (user_id, client_ip)

    def _check_owner_limits(self, user_id: str, client_ip: str | None) -> None:
        per_user, per_ip = self.settings.max_sessions_per_user, self.settings.max_sessions_per_ip
        if per_user and sum(u == user_id for u, _ in self._owners.values()) >= per_user:
            raise RateLimitExceeded(f"this user already has {per_user} sessions",
                                    {"max_sessions_per_user": per_user}, fatal=True)
        if per_ip and client_ip is not None and \
                sum(ip == client_ip for _, ip in self._owners.values()) >= per_ip:
            raise RateLimitExceeded(f"this address already has {per_ip} sessions",
                                    {"max_sessions_per_ip": per_ip}, fatal=True)

    async def create(self, session_id: str, user_id: str, config: VideoConfig,
                     transport: str = "websocket", client_ip: str | None = None) -> Session:
        """Build and start a session (raises ServiceError for bad config or limits).

        The calling task logs for ``session_id`` from here on, and so do the tasks it starts.
        """
        token = session_id_var.set(session_id)
        try:
            self._reserve(session_id, user_id, client_ip)
        except BaseException:
            session_id_var.reset(token)
            raise
        try:
            avatar = await self._avatar(config.avatar_id or self.settings.default_avatar)
            base_video = config.base_video or avatar.base_videos[0]
            video = self.video_settings(avatar, config)
            session = Session(session_id, user_id, avatar, self.engine, self.settings, video,
                              base_video, clock=self.clock, transport=transport,
                              phases=self.phases)
            self.sessions[session_id] = session
            self.metrics.session_opened(session.stats)
        finally:
            self._reserved.discard(session_id)
            if session_id not in self.sessions:
                self._owners.pop(session_id, None)
                session_id_var.reset(token)
        if self.placement is not None:  # counted once: no longer reserved
            await self.placement.claim(session_id)
            if session_id not in self.sessions:  # closed meanwhile: its release came first
                await self.placement.release(session_id)
        log.info("session %s opened: user=%s transport=%s avatar=%s %dx%d (%d/%d sessions)",
                 session_id, user_id, transport, avatar.avatar_id, video.width, video.height,
                 len(self.sessions), self.settings.max_sessions)
        return session

    def video_settings(self, avatar: Avatar, config: VideoConfig) -> VideoSettings:
        """What a session on ``avatar`` asking for ``config`` streams."""
        fps = self.settings.fps
        gop = config.gop_seconds or self.settings.gop_seconds
        width, height = config.size() or (avatar.width, avatar.height)
        return VideoSettings(width=width, height=height,
                             bitrate=config.bitrate or self.settings.default_bitrate,
                             gop_frames=max(1, round(gop * fps)), fps=fps)

    async def _avatar(self, avatar_id: str) -> Avatar:
        cached = self.store.cached(avatar_id)
        if cached is not None:
            return cached
        if not self.store.exists(avatar_id):
            raise ModelNotFound(f"avatar {avatar_id!r} is not prepared",
                                {"avatar_id": avatar_id, "available": self.store.ids()})
        return await asyncio.to_thread(self.store.get, avatar_id)

    def get(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise InvalidSession(f"no active session {session_id}", {"session_id": session_id}) from None

    # ---------------------------------------------------------------- viewers
    def grant_view(self, session_id: str) -> str:
        """The session's view token (made on first use): whoever holds it may watch."""
        self.get(session_id)
        return self._grants.setdefault(session_id, secrets.token_urlsafe(24))

    def revoke_view(self, session_id: str) -> bool:
        """Forget the view token: viewers already watching stay, new ones need a new grant."""
        self.get(session_id)
        return self._grants.pop(session_id, None) is not None

    def view_granted(self, session_id: str, *tokens: str | None) -> bool:
        grant = self._grants.get(session_id)
        if grant is None:
            return False
        want = grant.encode()
        return any(t is not None and hmac.compare_digest(t.encode(), want) for t in tokens)

    def admit_viewer(self, session_id: str, client_ip: str | None) -> str:
        """Count a viewer of ``session_id`` against the viewer limits (per session, per
        address, in all); its key, for :meth:`release_viewer`. Raises RateLimitExceeded."""
        s = self.settings
        rows = self._viewers.values()
        for limit, count, name in (
                (s.max_viewers, len(self._viewers), "max_viewers"),
                (s.max_viewers_per_session, sum(sid == session_id for sid, _ in rows),
                 "max_viewers_per_session"),
                (s.max_viewers_per_ip if client_ip is not None else 0,
                 sum(ip == client_ip for _, ip in rows), "max_viewers_per_ip")):
            if limit and count >= limit:
                raise RateLimitExceeded(f"viewer limit reached ({name.upper()}={limit})",
                                        {name: limit}, fatal=True)
        key = f"viewer-{secrets.token_hex(8)}"
        self._viewers[key] = (session_id, client_ip)
        return key

    def release_viewer(self, key: str | None) -> None:
        if key is not None:
            self._viewers.pop(key, None)

    def viewer_count(self) -> int:
        return len(self._viewers)

    def latest(self) -> Session | None:
        """The most recently opened session still active."""
        return next(reversed(self.sessions.values()), None)

    def attach(self, session_id: str, thing: Attachment) -> None:
        """Close ``thing`` when the session closes (raises InvalidSession if it is gone)."""
        self.get(session_id)
        self._attached.setdefault(session_id, []).append(thing)

    def attachments(self, session_id: str) -> list[Attachment]:
        return list(self._attached.get(session_id, ()))

    def detach(self, session_id: str, thing: Attachment) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._attached[session_id].remove(thing)

    async def close(self, session_id: str) -> None:
        """Close a session and what is attached to it. Shielded: a caller cancelled half-way
        (a connection's teardown at shutdown, say) must not leave the session popped from the
        registry with its tasks still running."""
        token = session_id_var.set(session_id)
        try:
            await asyncio.shield(self._close(session_id))
        finally:
            session_id_var.reset(token)

    async def _close(self, session_id: str) -> None:
        if self.placement is not None and session_id in self.sessions:
            # first: once it is gone from here, nothing is routed or placed by it any more
            await self.placement.release(session_id)
        session = self.sessions.pop(session_id, None)
        for thing in self._attached.pop(session_id, []):
            try:
                await thing.aclose()
            except Exception:  # noqa: BLE001 - one failing attachment must not keep the session
                log.exception("session %s: closing %r failed", session_id, thing)
        self._owners.pop(session_id, None)
        self._grants.pop(session_id, None)
        for key in [k for k, (sid, _) in self._viewers.items() if sid == session_id]:
            del self._viewers[key]  # its viewers are closed with it (their attachments)
        if session is not None:
            await session.close()
            st = session.stats
            self.metrics.session_closed(st)
            log.info("session %s closed: frames sent %d, dropped %d, skipped %d, speech frames %d, "
                     "audio %.1f s", session_id, st.frames_sent, st.frames_dropped,
                     st.skipped_frames, st.speech_frames, st.audio_samples / SAMPLE_RATE)

    async def close_all(self) -> None:
        for sid in list(self.sessions):
            await self.close(sid)


class Services:
    """Everything the app needs, built once at start-up."""

    def __init__(self, settings: Settings, engine: LipSyncEngine | None = None,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self.started = time.time()
        #: why the weight-free engine serves although MuseTalk was asked for (ENGINE=auto)
        self.demo_reason: str | None = None
        if engine is None:
            engine, self.demo_reason = select_engine(settings)
        self.engine = engine
        self._init_lock = threading.Lock()
        self.store = AvatarStore(settings.avatars_dir, settings.default_width,
                                 settings.default_height, settings.fps,
                                 self.engine.prepare_avatar,
                                 max_seconds=settings.max_prepare_seconds,
                                 max_pixels=settings.max_image_pixels,
                                 max_frames=settings.max_video_frames)
        self.sessions = SessionManager(settings, self.engine, self.store, clock)
        #: WebSocket H.264 encoders run here when set; started in the app's lifespan
        self.encoders = EncoderPool(settings.encoder_processes) if settings.encoder_processes else None
        #: idle loops encoded once, shared by every session's feed (None: encode live)
        self.loops = LoopCache(settings.idle_loops_max) if settings.shared_idle_loops else None
        #: each session's encoded output (feed.SessionFeed), shared by all its readers
        self.feeds: dict[str, Any] = {}
        #: sockets not yet authenticated, per client address (both WebSocket transports)
        self.pending = PendingLimit(settings.max_pending_per_ip)
        #: the serving replica when the service runs scaled out (reported in INIT_SUCCESS)
        self.replica_id: str | None = None

    def ensure_default_avatar(self) -> Avatar:
        return self.store.ensure_builtin(self.settings.default_avatar)

    async def build_idle_loops(self, avatar: Avatar) -> None:
        """Encode the loop that a session on ``avatar`` with default video settings starts on
        (``IDLE_LOOPS_AT_START``), so that even the first sessions copy their idle frames."""
        if self.loops is None or not self.settings.idle_loops_at_start:
            return
        clip = avatar.base_videos[0]
        key = LoopKey.of(avatar.avatar_id, clip, self.sessions.video_settings(avatar, VideoConfig()))
        await self.loops.ensure(key, avatar.clip(clip).frames)

    def initialize(self) -> None:
        """Load the engine unless it is loaded, and the default avatar (blocking, idempotent)."""
        with self._init_lock:
            if not self.engine.info().get("loaded"):
                self.engine.load()
            self.ensure_default_avatar()

    def health(self) -> dict[str, Any]:
        info = self.engine.info()
        return {"status": "ok", "version": __version__, "engine": info.get("name"),
                "model_loaded": bool(info.get("loaded")), "device": info.get("device"),
                "engine_info": info, "uptime_s": round(time.time() - self.started, 3),
                "sessions": len(self.sessions.sessions),
                "max_sessions": self.settings.max_sessions,
                # uvicorn answers only after start-up (engine, default avatar, idle loop)
                "ready": bool(info.get("loaded")), "replicas": None}

    async def aclose(self) -> None:
        await self.sessions.close_all()
        await asyncio.to_thread(self.store.close)
        await self.engine.aclose()
        if self.encoders is not None:
            await self.encoders.aclose()
        if self.loops is not None:
            await asyncio.to_thread(self.loops.close)
