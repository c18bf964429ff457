"""Recording over REST: start and stop a session's recording, list and download the MP4s.

The file is the session's own H.264 packets remuxed (no second video encode) plus its audio
as AAC (:mod:`..media.recorder`), in ``RECORDINGS_DIR``. Disk use is bounded by
``MAX_RECORDINGS_MB`` over the whole folder: a start when it is full is refused with 507 and a
clear message, and a recording that fills it stops there (``reason`` says so).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from ..api.access import owned_session
from ..api.auth import UNAUTHORIZED, Caller, Principal, require_token
from ..errors import InvalidSession, ModelNotFound, NotYours, RateLimitExceeded
from ..feed import SessionFeed, ensure_feed, release_feed
from ..manager import Services
from ..media.recorder import Recorder, RecordingInfo
from ..session import Session

router = APIRouter(tags=["recording"], dependencies=[Depends(require_token)],
                   responses=UNAUTHORIZED)
MAX_KEPT = 1000  # recordings remembered (the files stay until deleted by an operator)


class DiskFull(RateLimitExceeded):
    http_status = 507


class Recordings:
    """The recordings of this process: at most one running per session."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.dir = Path(services.settings.recordings_dir)
        self.max_bytes = services.settings.max_recordings_mb * 2**20
        self.known: dict[str, RecordingInfo] = {}
        self.running: dict[str, tuple[Recorder, SessionFeed]] = {}  # by session id

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.mp4")) if self.dir.exists() else 0

    async def start(self, session: Session) -> RecordingInfo:
        sid = session.session_id
        if sid in self.running:
            raise InvalidSession(f"session {sid} is already being recorded",
                                 {"recording_id": self.running[sid][0].info.recording_id})
        used = await asyncio.to_thread(self.used_bytes)
        if used >= self.max_bytes:
            raise DiskFull(f"recordings use {used // 2**20} MB of MAX_RECORDINGS_MB="
                           f"{self.max_bytes // 2**20}: delete some from RECORDINGS_DIR first",
                           {"used_mb": used // 2**20, "max_mb": self.max_bytes // 2**20})
        self.dir.mkdir(parents=True, exist_ok=True)
        rid = uuid.uuid4().hex
        info = RecordingInfo(rid, sid, self.dir / f"{rid}.mp4", user_id=session.user_id)
        v = session.video
        rec = Recorder(info, v.width, v.height, v.fps, self.max_bytes - used)
        feed = await ensure_feed(self.services, session)
        feed.add_recorder(rec)
        self.running[sid] = (rec, feed)
        self.services.sessions.attach(sid, _StopOnClose(self, sid))
        self.known[rid] = info
        if (placement := self.services.sessions.placement) is not None:
            await placement.claim(rid, info.as_dict())  # its download is routed here
        while len(self.known) > MAX_KEPT:
            self.known.pop(next(iter(self.known)))
        return info

    def visible(self, caller: Principal) -> list[RecordingInfo]:
        return [i for i in self.known.values() if caller.owns(i.user_id)]

    async def stop(self, session_id: str) -> RecordingInfo:
        entry = self.running.pop(session_id, None)
        if entry is None:
            raise InvalidSession(f"session {session_id} is not being recorded")
        rec, feed = entry
        feed.remove_recorder(rec)
        rec.stop()
        await asyncio.to_thread(rec.join)
        await release_feed(self.services, feed)
        if (placement := self.services.sessions.placement) is not None:
            await placement.release(rec.info.recording_id)  # finished, not lost
        return rec.info


class _StopOnClose:
    """Ends a session's recording when the session closes (an attachment of it)."""

    def __init__(self, recordings: Recordings, session_id: str) -> None:
        self.recordings, self.session_id = recordings, session_id

    async def aclose(self) -> None:
        if self.session_id in self.recordings.running:
            await self.recordings.stop(self.session_id)


def _recordings(request: Request) -> Recordings:
    rec: Recordings = request.app.state.recordings
    return rec


@router.post("/sessions/{session_id}/recording", status_code=201)
async def start_recording(request: Request, session_id: str, caller: Caller) -> dict[str, Any]:
    """Start recording the session (its own H.264 packets, remuxed, and its audio as AAC)."""
    session = owned_session(request.app.state.services.sessions, caller, session_id)
    return (await _recordings(request).start(session)).as_dict()


@router.delete("/sessions/{session_id}/recording")
async def stop_recording(request: Request, session_id: str, caller: Caller) -> dict[str, Any]:
    """Stop the session's recording and finish the file; answers where to download it."""
    owned_session(request.app.state.services.sessions, caller, session_id)
    return (await _recordings(request).stop(session_id)).as_dict()


@router.get("/recordings")
async def list_recordings(request: Request, caller: Caller) -> dict[str, Any]:
    """The caller's user's recordings (the operator: all), and the folder's disk use."""
    recs = _recordings(request)
    return {"recordings": [i.as_dict() for i in recs.visible(caller)],
            "used_mb": round(recs.used_bytes() / 2**20, 1), "max_mb": recs.max_bytes // 2**20}


@router.get("/recordings/{recording_id}", response_model=None)
async def download_recording(request: Request, recording_id: str,
                             caller: Caller) -> FileResponse:
    info = _recordings(request).known.get(recording_id)
    if not caller.operator and (info is None or not caller.owns(info.user_id)):
        raise NotYours(recording_id, "recording")  # another user's, or none: one answer
    if info is None or info.status != "done" or not info.path.exists():
        raise ModelNotFound(f"no finished recording {recording_id[:64]}",
                            {"recording_id": recording_id[:64]})
    return FileResponse(info.path, media_type="video/mp4", filename=f"{recording_id}.mp4")


def install(app: Any) -> None:
    async def start(app: Any) -> None:
        app.state.recordings = Recordings(app.state.services)

    app.state.startup_hooks.append(start)
    app.include_router(router)
