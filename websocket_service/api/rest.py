"""REST endpoints: health, sessions, avatars and their preparation jobs, the OpenAPI file."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import yaml
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from ..avatars.probe import check_source
from ..avatars.store import PrepareJob, validate_avatar_id
from ..errors import InvalidMessage, InvalidSession, ModelNotFound, PayloadTooLarge, ProcessingError
from ..manager import Services
from .access import owned_session
from .auth import UNAUTHORIZED, Caller, require_token
from .media_dir import check_suffix, media_file

public = APIRouter()  # open even when AUTH_TOKEN is set
router = APIRouter(dependencies=[Depends(require_token)], responses=UNAUTHORIZED)



class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    status: str
    version: str
    engine: str | None
    model_loaded: bool
    device: str | None
    engine_info: dict[str, Any]
    uptime_s: float
    sessions: int
    max_sessions: int
    ready: bool = Field(description="takes sessions now: the engine is loaded (on the cluster: "
                                    "every session replica is up; else 503 with this body)")
    replicas: dict[str, int] | None = Field(
        None, description="on the cluster: session replicas answering (up) and wanted (target)")
    event_loop_lag_ms: dict[str, float] | None = Field(
        None, description="how late the event loop woke up over the last minute: p50, p99, max "
                          "(and samples); frame pacing is only as good as this")


class JobOut(BaseModel):
    job_id: str
    avatar_id: str
    status: str = Field(description="queued | running | done | failed")
    progress: float
    message: str
    error: dict[str, Any] | None = None
    created: float
    finished: float | None = None
    status_url: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody},
    413: {"model": ErrorBody},
    429: {"model": ErrorBody},
}


def _services(request: Request) -> Services:
    return request.app.state.services


@public.get("/health", response_model=Health, tags=["service"],
            responses={503: {"model": Health, "description": "not ready (the cluster: session "
                                                             "replicas missing)"}})
async def health(request: Request) -> dict[str, Any]:
    """Liveness plus what the engine loaded, and whether sessions can be taken (``ready``)."""
    return {**_services(request).health(), "event_loop_lag_ms": request.app.state.loop_lag.summary()}


@router.get("/sessions", tags=["service"])
async def sessions(request: Request, caller: Caller) -> dict[str, Any]:
    """Every active session of the caller's user (the operator: every session) with its
    counters and latency percentiles."""
    svc = _services(request)
    mgr = svc.sessions
    items = [s.describe() for s in mgr.sessions.values() if caller.owns(s.user_id)]
    return {"count": len(items), "max_sessions": mgr.settings.max_sessions,
            "engine": {"name": svc.engine.name, **svc.engine.stats()}, "sessions": items}


@router.get("/sessions/{session_id}", tags=["service"], responses=ERRORS)
async def session_detail(request: Request, session_id: str, caller: Caller) -> dict[str, Any]:
    try:
        return owned_session(_services(request).sessions, caller, session_id).describe()
    except InvalidSession:
        raise ModelNotFound(f"no active session {session_id}", {"session_id": session_id[:64]}) from None


@router.get("/avatars", tags=["avatars"])
async def avatars(request: Request) -> dict[str, Any]:
    store = _services(request).store
    return {"avatars": [store.describe(a) for a in store.ids()]}


@router.get("/avatars/{avatar_id}", tags=["avatars"], responses=ERRORS)
async def avatar_detail(request: Request, avatar_id: str) -> dict[str, Any]:
    return _services(request).store.describe(avatar_id)


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["avatars"], responses=ERRORS)
async def job_detail(request: Request, job_id: str) -> dict[str, Any]:
    job = _services(request).store.job(job_id)
    if job is None:
        raise ModelNotFound(f"no preparation job {job_id}", {"job_id": job_id[:64]})
    return job_out(job)


def job_out(job: PrepareJob) -> dict[str, Any]:
    """A job as :class:`JobOut`: its state plus the URL to poll."""
    return {**job.as_dict(), "status_url": f"/jobs/{job.job_id}"}


def check_job_slot(svc: Services) -> None:
    """Raise ``RateLimitExceeded`` (429) early while all preparation slots are taken
    (``submit`` takes one atomically, and refuses the same way if another request won it)."""
    svc.store.check_job_slot()


def _copy_limited(src: BinaryIO, suffix: str, max_bytes: int) -> Path:
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="avatar-upload-")
    size = 0
    with open(fd, "wb") as out:
        while chunk := src.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                break
            out.write(chunk)
    if size > max_bytes:
        Path(tmp).unlink(missing_ok=True)
        raise PayloadTooLarge(f"upload exceeds {max_bytes >> 20} MB (MAX_UPLOAD_MB)",
                              {"max_bytes": max_bytes})
    return Path(tmp)


async def check_media_size(source: Path, max_pixels: int) -> None:
    """Refuse (400, before any 202) a source whose header declares more than ``max_pixels``;
    one whose header cannot be read is left to the job, which fails it as PROCESSING_ERROR."""
    try:
        await asyncio.to_thread(check_source, source, max_pixels)
    except ProcessingError:
        pass


@router.post("/prepare_avatar/{user_id}", status_code=202, response_model=JobOut,
             tags=["avatars"], responses=ERRORS)
async def prepare_avatar(
    request: Request,
    user_id: str,
    file: Annotated[UploadFile | None, File(description="an image or video of a face")] = None,
    path: Annotated[str | None, Form(description="a file inside MEDIA_DIR instead of an upload")] = None,
    avatar_id: Annotated[str | None, Query(description="defaults to user_id")] = None,
) -> dict[str, Any]:
    """Start preparing an avatar in the background; poll ``status_url`` for progress."""
    svc = _services(request)
    aid = validate_avatar_id(avatar_id or user_id)
    if (file is None) == (path is None):
        raise InvalidMessage("send exactly one of: a 'file' upload or a 'path' inside MEDIA_DIR")
    svc.store.claim_job_slot()  # before the upload is copied: refuse early, and atomically
    try:
        if file is not None:
            suffix = check_suffix(file.filename or "")
            source = await asyncio.to_thread(_copy_limited, file.file, suffix,
                                             svc.settings.max_upload_mb << 20)
            try:
                await check_media_size(source, svc.settings.max_image_pixels)
            except BaseException:
                source.unlink(missing_ok=True)
                raise
            job = svc.store.submit(aid, source, cleanup=True, claimed=True)
        else:
            assert path is not None
            source = media_file(svc.settings.media_dir, path)
            check_suffix(source.name)
            await check_media_size(source, svc.settings.max_image_pixels)
            job = svc.store.submit(aid, source, claimed=True)
    except BaseException:
        svc.store.release_job_slot()  # the job never started
        raise
    return job_out(job)


@public.get("/openapi.yaml", include_in_schema=False)
async def openapi_yaml(request: Request) -> PlainTextResponse:
    return PlainTextResponse(openapi_text(request.app.openapi()), media_type="application/yaml")


def openapi_text(schema: dict[str, Any]) -> str:
    return yaml.safe_dump(schema, sort_keys=False, allow_unicode=True)


_VALIDATION_REF = "#/components/schemas/HTTPValidationError"


def invalid_requests_are_400(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (changed in place) documenting what the service answers to a request that
    fails validation: 400 with an :class:`ErrorBody` (``INVALID_MESSAGE``), like any other
    refusal, where FastAPI would document 422 with its own body."""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            responses = op.get("responses", {})
            ref = responses.get("422", {}).get("content", {}).get("application/json", {}) \
                .get("schema", {}).get("$ref")
            if ref == _VALIDATION_REF:
                del responses["422"]
                responses.setdefault("400", {
                    "description": "Bad Request (INVALID_MESSAGE: a parameter or the body is "
                                   "invalid)",
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/ErrorBody"}}}})
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return schema


def error_response(code: str, message: str, details: dict[str, Any], status: int,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(code=code, message=message, details=details).model_dump(), status,
                        headers=headers)


__all__ = ["check_job_slot", "check_media_size", "error_response", "invalid_requests_are_400", "job_out",
           "openapi_text", "public", "router"]
