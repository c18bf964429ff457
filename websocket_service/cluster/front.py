"""The REST front's view over every session replica.

``GET /sessions``, ``GET /sessions/{id}``, ``GET /metrics`` and ``GET /recordings`` gather from
every replica with ``DeploymentHandle.broadcast`` (a control-plane call: it bypasses the
routers and the replicas' slots, so a full replica still answers). A request that names a session
or a recording (``POST|DELETE /sessions/{id}/...``: controls, recording, view grants;
``GET /recordings/{id}``; ``POST /offer`` for a viewer; ``/api/webrtc/realtime/stop``) is
forwarded with ``handle.options(session_id=id)``: Serve's router for the session replicas
(:mod:`.routing`) sends it to the replica that holds the id, which answers with its own routes.
A request that opens a session (``POST /offer`` for a new peer, ``/api/webrtc/realtime/start``)
is forwarded without one, and the router places it on the replica with the fewest sessions: the
peer connection or server-side session then lives, and counts, there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIWebSocketRoute
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from ..api.auth import UNAUTHORIZED, Caller, Credentials, Principal, require_token
from ..api.metrics import session_gauges_allowed
from ..api.rest import error_response
from ..errors import ModelNotFound, NotYours, RateLimitExceeded
from ..manager import Services
from . import registry

#: how long the front waits for the replicas' answers
GATHER_TIMEOUT_S = 5.0
FORWARDED_HEADERS = ("authorization", "content-type")
ANSWERED_HEADERS = ("content-disposition", "retry-after")
#: what a refused new session is told to wait (the front adds it to 429 and 503 answers)
RETRY_AFTER_S = 1

log = logging.getLogger(__name__)


class ServiceUnavailable(RateLimitExceeded):
    """No session replica could answer (one died under the request): try again."""
    http_status = 503


router = APIRouter(dependencies=[Depends(require_token)], responses=UNAUTHORIZED)
open_router = APIRouter()


# ------------------------------------------------------------------ on each session replica
def replica_sessions(services: Services, subject: str | None = None) -> dict[str, Any]:
    """This replica's sessions: ``subject``'s only, unless None (the operator)."""
    mgr = services.sessions
    rid = services.replica_id
    caller = Principal(subject)
    return {"replica_id": rid, "count": len(mgr.sessions),
            "max_sessions": services.settings.max_sessions,
            "engine": {"name": services.engine.name, **services.engine.stats()},
            "sessions": [{**s.describe(), "replica_id": rid} for s in mgr.sessions.values()
                         if caller.owns(s.user_id)]}


def replica_metrics(services: Services, with_sessions: bool = False) -> dict[str, Any]:
    mgr = services.sessions
    live = {sid: s.stats for sid, s in mgr.sessions.items()}
    text = mgr.metrics.render(live.values(), services.settings.max_sessions,
                              {"name": services.engine.name, **services.engine.stats()},
                              live if with_sessions else None)
    return {"replica_id": services.replica_id, "text": text}


async def replica_forward(app: ASGIApp, request: dict[str, Any]) -> dict[str, Any]:
    """Answer a forwarded request with this replica's own routes."""
    # the caller's address, not the front's: the per-address limits count it
    transport = httpx.ASGITransport(app=app, client=(request.get("client") or "127.0.0.1", 0))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        r = await client.request(request["method"], request["path"], params=request["query"],
                                 headers=request["headers"], content=request["body"])
    return {"status": r.status_code, "media_type": r.headers.get("content-type"),
            "headers": {k: v for k, v in r.headers.items() if k in ANSWERED_HEADERS},
            "body": r.content}


# ------------------------------------------------------------------ on the front
async def _gather(request: Request, method: str, *args: Any) -> list[Any]:
    handle: DeploymentHandle = request.app.state.replicas
    try:
        results = await handle.broadcast(method, *args).results_async(
            timeout_s=GATHER_TIMEOUT_S, return_exceptions=True)
    except TimeoutError:
        raise ServiceUnavailable("the session replicas did not answer in time; try again") \
            from None
    # a replica that died since the router last heard of it answers with an exception
    return [r for r in results if not isinstance(r, BaseException)]


@router.get("/sessions", tags=["service"])
async def sessions(request: Request, caller: Caller) -> dict[str, Any]:
    """Every active session of the caller's user (the operator: all) on every replica, each
    with its ``replica_id``."""
    parts = sorted(await _gather(request, "sessions", caller.subject),
                   key=lambda p: str(p["replica_id"]))
    items = [s for p in parts for s in p["sessions"]]
    return {"count": len(items), "max_sessions": sum(p["max_sessions"] for p in parts),
            "replicas": [{k: p.get(k) for k in ("replica_id", "count", "max_sessions", "engine",
                                                "node_id", "gpus")} for p in parts],
            "sessions": items}


@router.get("/sessions/{session_id}", tags=["service"])
async def session_detail(request: Request, session_id: str, caller: Caller) -> dict[str, Any]:
    for part in await _gather(request, "sessions", caller.subject):
        for s in part["sessions"]:
            if s["session_id"] == session_id:
                return s
    if not caller.operator:
        raise NotYours(session_id)  # another user's, or none: one answer
    raise ModelNotFound(f"no active session {session_id}", {"session_id": session_id[:64]})


async def _forwarded(request: Request) -> dict[str, Any]:
    return {"method": request.method, "path": request.url.path,
            "query": str(request.url.query),
            "client": request.client.host if request.client else None,
            "headers": {k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS},
            "body": await request.body()}


async def forward(request: Request, key: str | None) -> Response:
    """Have the replica that holds ``key`` (None: the one a new session goes to) answer."""
    handle: DeploymentHandle = request.app.state.replicas
    if key:
        handle = handle.options(session_id=key)
    try:
        answer = await handle.forward.remote(await _forwarded(request))
    except Exception as exc:  # noqa: BLE001 - the replica died under the request
        raise ServiceUnavailable("the session replica did not answer; try again",
                                 {"reason": type(exc).__name__}) from None
    headers = answer.get("headers", {})
    if answer["status"] in (429, 503):
        headers.setdefault("retry-after", str(RETRY_AFTER_S))
    return Response(answer["body"], answer["status"], headers=headers,
                    media_type=answer["media_type"])


@router.api_route("/sessions/{session_id}/{control:path}", methods=["POST", "DELETE"],
                  include_in_schema=False)
async def session_control(request: Request, session_id: str) -> Response:
    """Controls, recording and view grants: answered by the replica that holds the session."""
    return await forward(request, session_id)


async def _registry(request: Request, method: str, *args: Any, default: Any = None) -> Any:
    """Ask the session registry (:mod:`.registry`); ``default`` when it does not answer."""
    try:
        if getattr(request.app.state, "registry", None) is None:
            request.app.state.registry = registry.get()
        return await asyncio.wait_for(
            getattr(request.app.state.registry, method).remote(*args), GATHER_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - e.g. restarting: what the replicas say is enough
        log.warning("session registry: %s failed", method, exc_info=True)
        request.app.state.registry = None
        return default


@router.get("/recordings/{recording_id}", include_in_schema=False)
async def recording_download(request: Request, recording_id: str, caller: Caller) -> Response:
    """From the replica that made it; one whose replica stopped while recording: failed."""
    info = await _registry(request, "recording", recording_id)
    if info is not None and info["status"] == "failed":
        if not caller.owns(info["user_id"]):
            raise NotYours(recording_id, "recording")
        raise ModelNotFound(f"recording {recording_id} failed: its replica stopped while "
                            "recording", {"recording_id": recording_id, "status": "failed",
                                          "reason": info["reason"]})
    return await forward(request, recording_id)


@open_router.post("/offer", include_in_schema=False)
async def offer(request: Request) -> Response:
    """A viewer's offer goes to its session's replica; a new peer to the least loaded one.
    The replica checks the token (a Bearer header, or ``auth_token`` in the body)."""
    try:
        key = json.loads(await request.body()).get("session_id")
    except (ValueError, AttributeError):
        key = None  # the replica answers the bad body
    return await forward(request, key if isinstance(key, str) else None)


@router.post("/api/webrtc/realtime/start", include_in_schema=False)
@router.post("/api/webrtc/realtime/stop", include_in_schema=False)
async def realtime(request: Request) -> Response:
    return await forward(request, request.query_params.get("session_id"))


@router.get("/recordings", include_in_schema=False)
async def recordings(request: Request, caller: Caller) -> Response:
    """Every replica's recordings, and those lost with a replica (status failed); the
    folder's use is the largest (one folder when they share it)."""
    parts = [json.loads(a["body"]) for a in
             await _gather(request, "forward", await _forwarded(request)) if a["status"] == 200]
    if not parts:
        raise ServiceUnavailable("no session replica answered; try again")
    listed = [r for p in parts for r in p["recordings"]]
    ids = {r["recording_id"] for r in listed}
    listed += [r for r in await _registry(request, "failed_recordings", default=[])
               if r["recording_id"] not in ids and caller.owns(r["user_id"])]
    return JSONResponse({"recordings": listed,
                         "used_mb": max(p["used_mb"] for p in parts),
                         "max_mb": parts[0]["max_mb"]})


@open_router.get("/health", tags=["service"])
async def health(request: Request) -> Response:
    """The front's health, ready when every wanted session replica answers (else 503): what a
    load balancer's readiness probe asks."""
    services: Services = request.app.state.services
    try:
        up = len(await _gather(request, "sessions", None))
    except Exception:  # noqa: BLE001 - no session application (starting, drained): none up
        up = 0
    target: int = request.app.state.target_replicas
    body = {**services.health(), "replicas": {"up": up, "target": target}}
    body["ready"] = bool(body["ready"]) and up >= target
    body["status"] = "ok" if body["ready"] else "not_ready"
    return JSONResponse(body, 200 if body["ready"] else 503)


@open_router.get("/metrics", tags=["service"])
async def metrics(request: Request, credentials: Credentials) -> Response:
    """Every replica's counters, labelled ``replica`` (per-session gauges as on one host)."""
    allowed = session_gauges_allowed(request.app.state.services.settings, credentials)
    parts = await _gather(request, "metrics", allowed)
    text = merge_metrics({str(p["replica_id"]): p["text"] for p in parts})
    return Response(text, media_type="text/plain; version=0.0.4")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(.*)$")


def merge_metrics(texts: dict[str, str]) -> str:
    """One Prometheus exposition from several: each sample gains ``replica="…"``, and every
    family keeps its samples together under one HELP/TYPE header."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    family = ""
    for replica, text in sorted(texts.items()):
        for line in text.splitlines():
            if line.startswith("# "):
                family = line.split()[2]
                head = headers.setdefault(family, [])
                if len(head) < 2 and line not in head:
                    head.append(line)
                samples.setdefault(family, [])
            elif m := _SAMPLE.match(line):
                labels = f'replica="{replica}"' + ("," + m[2][1:-1] if m[2] else "")
                samples.setdefault(family, []).append(f"{m[1]}{{{labels}}} {m[3]}")
    lines = [x for fam in headers for x in (*headers[fam], *samples[fam])]
    return "\n".join(lines) + "\n"


async def no_sessions_here(ws: WebSocket) -> None:
    """Sockets reach the front only while the session application is not deployed (e.g. it is
    draining): the front must not hold sessions itself."""
    await ws.accept()
    await ws.close(ServiceUnavailable.close_code,
                   "no session replica is taking sessions; try again later")


def install(app: FastAPI, replicas: DeploymentHandle, target_replicas: int = 1) -> None:
    """Put the cluster's routes in place of the single-process ones with the same path, and
    refuse sessions (they belong on the session replicas); ``target_replicas``: how many must
    answer for ``/health`` to say ready."""
    app.state.replicas = replicas
    app.state.target_replicas = target_replicas

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(_: Request, exc: ServiceUnavailable) -> JSONResponse:
        return error_response(exc.code, exc.message, exc.details, exc.http_status,
                              {"Retry-After": str(RETRY_AFTER_S)})

    routes = app.router.routes
    routes[:] = [r for r in routes if not isinstance(r, APIWebSocketRoute)]
    app.add_api_websocket_route("/musetalk/{path:path}", no_sessions_here)
    for new in [*router.routes, *open_router.routes]:
        assert isinstance(new, APIRoute)
        same = [i for i, old in enumerate(routes) if isinstance(old, APIRoute)
                and old.path == new.path and old.methods == new.methods]
        if same and new.include_in_schema:
            routes[same[0]] = new
        else:  # a forwarding route: ahead of (and documented by) the route it stands for
            routes.insert(0, new)
