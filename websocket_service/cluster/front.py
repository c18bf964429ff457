"""The REST front's view over every session replica.

``GET /sessions``, ``GET /sessions/{id}`` and ``GET /metrics`` gather from every replica with
``DeploymentHandle.broadcast`` (a control-plane call: it bypasses the session slots, so a full
replica still answers); the session controls (``POST /sessions/{id}/audio``, ``/action/{name}``,
``/interrupt``, ``/end_of_speech``) are forwarded to the replica that holds the session and
answered by its own routes. ``POST /offer`` ends at the answer, so its peer connection would be
neither pinned to nor counted on a replica: on the cluster WebRTC clients use the signaling
WebSocket ``/musetalk/v1/rtc/{user_id}`` instead.
"""

from __future__ import annotations

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
from ..errors import InternalError, InvalidMessage, InvalidSession, ModelNotFound, NotYours
from ..manager import Services

#: how long the front waits for the replicas' answers
GATHER_TIMEOUT_S = 5.0
CLOSE_TRY_AGAIN = 1013
FORWARDED_HEADERS = ("authorization", "content-type")

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


async def replica_forward(services: Services, app: ASGIApp, session_id: str,
                          request: dict[str, Any]) -> dict[str, Any] | None:
    """Answer a forwarded session-control request if this replica holds the session."""
    if session_id not in services.sessions.sessions:
        return None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        r = await client.request(request["method"], request["path"], params=request["query"],
                                 headers=request["headers"], content=request["body"])
    return {"status": r.status_code, "media_type": r.headers.get("content-type"),
            "body": r.content}


# ------------------------------------------------------------------ on the front
async def _gather(request: Request, method: str, *args: Any) -> list[Any]:
    handle: DeploymentHandle = request.app.state.replicas
    try:
        results = await handle.broadcast(method, *args).results_async(
            timeout_s=GATHER_TIMEOUT_S, return_exceptions=True)
    except TimeoutError:
        raise InternalError("the session replicas did not answer in time") from None
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
            "replicas": [{k: p[k] for k in ("replica_id", "count", "max_sessions", "engine")}
                         for p in parts],
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


@router.api_route("/sessions/{session_id}/{control:path}", methods=["POST", "DELETE"],
                  include_in_schema=False)
async def session_control(request: Request, session_id: str, control: str,
                          caller: Caller) -> Response:
    """Forward to the replica that holds the session; it answers with its own routes."""
    forwarded = {"method": request.method, "path": request.url.path,
                 "query": str(request.url.query),
                 "headers": {k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS},
                 "body": await request.body()}
    for answer in await _gather(request, "forward", session_id, forwarded):
        if answer is not None:
            return Response(answer["body"], answer["status"], media_type=answer["media_type"])
    if not caller.operator:
        raise NotYours(session_id)
    raise InvalidSession(f"no active session {session_id}", {"session_id": session_id[:64]})


@router.post("/offer", tags=["webrtc"])
async def offer() -> None:
    raise InvalidMessage("POST /offer is not available on the cluster: its peer connection would "
                         "not be pinned to a replica. Use the signaling WebSocket "
                         "/musetalk/v1/rtc/{user_id}.")


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
    await ws.close(CLOSE_TRY_AGAIN, "no session replica is taking sessions; try again later")


def install(app: FastAPI, replicas: DeploymentHandle, target_replicas: int = 1) -> None:
    """Put the cluster's routes in place of the single-process ones with the same path, and
    refuse sessions (they belong on the session replicas); ``target_replicas``: how many must
    answer for ``/health`` to say ready."""
    app.state.replicas = replicas
    app.state.target_replicas = target_replicas
    routes = app.router.routes
    routes[:] = [r for r in routes if not isinstance(r, APIWebSocketRoute)]
    app.add_api_websocket_route("/musetalk/{path:path}", no_sessions_here)
    for new in [*router.routes, *open_router.routes]:
        assert isinstance(new, APIRoute)
        same = [i for i, old in enumerate(routes) if isinstance(old, APIRoute)
                and old.path == new.path and old.methods == new.methods]
        if same:
            routes[same[0]] = new
        else:  # the forwarding route: ahead of the replica-only controls it stands for
            routes.insert(0, new)
