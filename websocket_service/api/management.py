"""The management API of the MuseTalk WebRTC integration that existing front-ends call.

* ``GET  /api/webrtc/musetalk/status``: the engine, whether it is loaded, demo mode, avatars;
* ``POST /api/webrtc/avatar/initialize``: load the engine if it is not (idempotent, 503 if not);
* ``POST /api/webrtc/avatar/prepare``: prepare an avatar from a file in ``MEDIA_DIR`` (a job);
* ``POST /api/webrtc/realtime/start``: a server-side session, no client socket, that plays an
  audio file from ``MEDIA_DIR`` lip-synced and then idles; watch it with ``POST /offer``
  ``{"session_id": ...}`` (receive-only viewers, as many as ``MAX_RTC_CLIENTS`` allows);
* ``POST /api/webrtc/realtime/stop``: close a server-side session (else it runs until shutdown).

All need the bearer token when ``AUTH_TOKEN`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..avatars.store import validate_avatar_id
from ..errors import InvalidMessage, InvalidSession, ServiceError
from ..manager import Services
from ..protocol import VideoConfig
from ..realtime import AudioFeeder, read_audio
from ..units import ID_PATTERN
from .access import check_user, owned_session
from .auth import UNAUTHORIZED, Caller, require_token
from .media_dir import check_suffix, media_file
from .rest import ErrorBody, JobOut, check_job_slot, check_media_size, error_response, job_out

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/webrtc", tags=["management"],
                   dependencies=[Depends(require_token)], responses=UNAUTHORIZED)

SERVER_TRANSPORT = "server"
PATH = Query(min_length=1, max_length=1024, description="a file inside MEDIA_DIR")
WHY = {400: "bad input, or a path that leads out of MEDIA_DIR",
       403: "a JWT naming another user's session, or one that does not exist", 404: "no such file, avatar or session",
       409: "a session with this id is active", 422: "the audio file cannot be decoded",
       429: "too many sessions or preparations", 503: "the engine could not load; the message says why"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": WHY[c]} for c in codes}


class MuseTalkStatus(BaseModel):
    initialized: bool = Field(description="the engine is loaded and serving")
    current_avatar: str | None = Field(
        description="the avatar of the most recent active session; else the default avatar "
                    "once loaded")
    loaded_avatars: list[str] = Field(description="avatars held in memory, ready to stream")
    engine: str = Field(description="the engine in use: geometric or musetalk")
    demo_mode: bool = Field(description="MuseTalk could not load (ENGINE=auto) and the "
                                        "weight-free engine serves instead")
    demo_reason: str | None = Field(None, description="why MuseTalk could not load")


class InitializeOut(BaseModel):
    status: Literal["success"] = "success"
    engine: str
    demo_mode: bool


class RealtimeOut(BaseModel):
    session_id: str
    status: Literal["started"] = "started"
    avatar_id: str
    audio_seconds: float = Field(description="length of the audio being played (0: none)")


class StopOut(BaseModel):
    session_id: str
    status: Literal["stopped"] = "stopped"


def _services(request: Request) -> Services:
    return request.app.state.services


@router.get("/musetalk/status", response_model=MuseTalkStatus)
async def status(request: Request) -> MuseTalkStatus:
    """Whether the engine is loaded, which one, demo mode, and the avatars in memory."""
    svc = _services(request)
    latest = svc.sessions.latest()
    default = svc.settings.default_avatar
    current = latest.avatar.avatar_id if latest is not None else (
        default if svc.store.cached(default) is not None else None)
    return MuseTalkStatus(initialized=bool(svc.engine.info().get("loaded")),
                          current_avatar=current, loaded_avatars=svc.store.loaded_ids(),
                          engine=svc.engine.name, demo_mode=svc.demo_reason is not None,
                          demo_reason=svc.demo_reason)


@router.post("/avatar/initialize", response_model=InitializeOut, responses=_errors(503))
async def initialize(request: Request) -> InitializeOut | JSONResponse:
    """Load the engine and the default avatar unless they are loaded (idempotent)."""
    svc = _services(request)
    try:
        await asyncio.to_thread(svc.initialize)
    except ServiceError as err:
        return error_response(err.code, f"the engine could not load: {err.message}",
                              err.details, 503)
    except Exception as exc:  # noqa: BLE001 - reported to the operator who asked
        log.exception("initialize failed")
        return error_response("INTERNAL_ERROR", "the engine could not load: "
                              f"{exc.__class__.__name__}: {exc}"[:500], {}, 503)
    return InitializeOut(engine=svc.engine.name, demo_mode=svc.demo_reason is not None)


@router.post("/avatar/prepare", status_code=202, response_model=JobOut,
             responses=_errors(400, 404, 429))
async def prepare(request: Request,
                  avatar_id: Annotated[str, Query(max_length=200)],
                  video_path: Annotated[str, PATH]) -> dict[str, Any]:
    """Prepare an avatar from an image or video in ``MEDIA_DIR`` in the background; poll
    ``status_url``. When done it is listed in ``loaded_avatars`` and ``GET /avatars``."""
    svc = _services(request)
    aid = validate_avatar_id(avatar_id)
    check_job_slot(svc)
    source = media_file(svc.settings.media_dir, video_path)
    check_suffix(source.name)
    await check_media_size(source, svc.settings.max_image_pixels)
    return job_out(svc.store.submit(aid, source))


@router.post("/realtime/start", response_model=RealtimeOut,
             responses=_errors(400, 404, 409, 422, 429))
async def realtime_start(
    request: Request,
    caller: Caller,
    session_id: Annotated[str | None, Query(pattern=ID_PATTERN,
                                            description="a new id (default: a UUID)")] = None,
    avatar_id: Annotated[str | None, Query(pattern=ID_PATTERN,
                                           description="default: DEFAULT_AVATAR")] = None,
    audio_path: Annotated[str | None, Query(
        min_length=1, max_length=1024,
        description="a WAV (any rate or channels) or other audio file inside MEDIA_DIR; "
                    "without it the session only idles")] = None,
    user_id: Annotated[str | None, Query(
        pattern=ID_PATTERN,
        description="the session's owner (default: the token's subject, else 'server'); a "
                    "JWT may open sessions only for its own subject")] = None,
) -> RealtimeOut | JSONResponse:
    """Start a server-side session that plays ``audio_path`` lip-synced, then idles, until
    ``/realtime/stop`` or shutdown. Watch it with ``POST /offer`` ``{"session_id": ...}``."""
    svc = _services(request)
    user_id = user_id or caller.subject or "server"
    check_user(caller, user_id)
    pcm = None
    if audio_path is not None:
        pcm = await asyncio.to_thread(read_audio, media_file(svc.settings.media_dir, audio_path))
    sid = session_id or str(uuid.uuid4())
    mgr = svc.sessions
    try:
        session = await mgr.create(sid, user_id, VideoConfig(avatar_id=avatar_id),
                                   transport=SERVER_TRANSPORT)
    except InvalidSession as err:  # the only InvalidSession create raises: a duplicate id
        return error_response(err.code, err.message, err.details, 409)
    feeder = AudioFeeder(session, pcm, mgr.clock) if pcm is not None else None
    try:
        session.start()
        if feeder is not None:
            mgr.attach(sid, feeder)
            feeder.start()
    except BaseException:
        await mgr.close(sid)
        raise
    return RealtimeOut(session_id=sid, avatar_id=session.avatar.avatar_id,
                       audio_seconds=round(feeder.seconds, 3) if feeder else 0.0)


@router.post("/realtime/stop", response_model=StopOut, responses=_errors(400, 403, 404))
async def realtime_stop(request: Request, caller: Caller,
                        session_id: Annotated[str, Query(pattern=ID_PATTERN)]) -> StopOut:
    """Close a server-side session; its viewers are disconnected."""
    mgr = _services(request).sessions
    if owned_session(mgr, caller, session_id).transport != SERVER_TRANSPORT:
        raise InvalidMessage("this session belongs to a client connection and closes with it",
                             {"session_id": session_id})
    await mgr.close(session_id)
    return StopOut(session_id=session_id)


__all__ = ["SERVER_TRANSPORT", "router"]
