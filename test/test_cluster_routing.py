"""The session registry's bookkeeping and the router's reading of a request, without Ray
running (the actor's class is plain Python; the proxy's request is a pickled ASGI scope)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray.serve._private.common import RequestMetadata, StreamingHTTPRequest
from ray.serve._private.request_router.common import PendingRequest

from websocket_service.app import create_app
from websocket_service.cluster import front
from websocket_service.cluster.front import replica_forward
from websocket_service.cluster.registry import SessionRegistry
from websocket_service.cluster.routing import request_key, url_key
from websocket_service.config import Settings


def test_new_sessions_go_to_the_least_loaded_counting_those_not_opened_yet() -> None:
    reg = SessionRegistry(reservation_ttl_s=60)
    reg.claim("a", "s1")
    # a burst: each placement reserves, so the next one sees it before any INIT
    firsts = []
    for i in range(5):
        firsts.append(reg.place(["a", "b"], f"r{i}")[0])
        assert abs(reg.load("a") - reg.load("b")) <= 1, firsts
    assert firsts[0] == "b" and reg.load("a") == reg.load("b") == 3
    reg.claim("b", "s2")  # a session opening settles one of its replica's reservations
    assert reg.load("b") == 3 and len(reg.reserved["b"]) == 2
    for request_id in list(reg.reserved["b"]):  # requests that ended without opening one
        reg.settle(request_id)  # (a refused socket, a viewer)
    assert reg.load("b") == 1
    assert reg.place([], "r9") == []


def test_reservations_expire() -> None:
    reg = SessionRegistry(reservation_ttl_s=0)
    reg.place(["a", "b"], "r0")
    reg.claim("b", "s")
    assert reg.place(["a", "b"], "r1")[0] == "a"  # r0's reservation is gone


def test_lookup_release_and_a_lost_replica() -> None:
    reg = SessionRegistry()
    reg.claim("a", "s1")
    reg.claim("a", "rec1", {"recording_id": "rec1", "status": "recording", "user_id": "u"})
    reg.claim("a", "rec2", {"recording_id": "rec2", "status": "recording", "user_id": "u"})
    reg.release("a", "rec2")  # finished
    assert reg.lookup("s1") == reg.lookup("rec1") == "a" and reg.lookup("nope") is None
    reg.forget("a")
    assert reg.lookup("s1") is None and reg.load("a") == 0
    assert reg.lookup("rec1") == "a"  # still routed by id: a draining replica may finish it
    assert [r["recording_id"] for r in reg.failed_recordings()] == ["rec1"]
    assert reg.recording("rec1")["reason"] == "replica_lost"
    assert reg.recording("rec2")["status"] == "done"
    reg.release("a", "rec1")  # the draining replica finished it after all
    assert reg.failed_recordings() == []
    reg.claim("b", "s2")
    reg.release("b", "s2")
    assert reg.lookup("s2") is None and reg.load("b") == 0


@pytest.mark.parametrize(("path", "query", "key"), [
    ("/musetalk/v1/bridge/abc", b"token=t", "abc"),
    ("/musetalk/v1/mic/abc", b"", "abc"),
    ("/musetalk/v1/ws/u1", b"session_id=abc&x=1", "abc"),
    ("/musetalk/v1/rtc/u1", b"session_id=abc", "abc"),
    ("/musetalk/v1/ws/u1", b"", None),
    ("/musetalk/v1/ws/u1", b"token=abc", None),
])
def test_the_session_a_url_names(path: str, query: bytes, key: str | None) -> None:
    assert url_key(path, query) == key


def pending(*args: object, session_id: str = "") -> PendingRequest:
    """(Called in a running loop: the request carries an asyncio future.)"""
    meta = RequestMetadata(request_id="r", internal_request_id="i", session_id=session_id)
    return PendingRequest(args=list(args), kwargs={}, metadata=meta)


async def test_the_session_a_request_names() -> None:
    scope = {"type": "websocket", "path": "/musetalk/v1/ws/u", "query_string": b"session_id=s"}
    proxied = pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))
    assert request_key(pending(proxied)) == "s"  # from the proxy: its URL
    assert request_key(pending(proxied, session_id="h")) == "h"  # Serve's session key first
    assert request_key(pending({"method": "POST"}, session_id="k")) == "k"  # the front's call
    assert request_key(pending({"method": "POST"})) is None  # a new session
    assert request_key(pending(b"not a pickle")) is None


async def test_a_forwarded_request_keeps_the_callers_address() -> None:
    """The front forwards for many clients: the replica's per-address limits count each."""
    app = FastAPI()

    @app.get("/who")
    async def who(request: Request) -> dict[str, str | None]:
        return {"ip": request.client.host if request.client else None}

    forwarded = {"method": "GET", "path": "/who", "query": "", "headers": {}, "body": b"",
                 "client": "203.0.113.7"}
    answer = await replica_forward(app, forwarded)
    assert answer["status"] == 200 and json.loads(answer["body"]) == {"ip": "203.0.113.7"}


class DeadReplicas:
    """Serve's handle to the session replicas, the one they sent the call to having died."""

    def options(self, **_: object) -> DeadReplicas:
        return self

    @property
    def forward(self) -> DeadReplicas:
        return self

    async def remote(self, *_: object) -> None:
        raise RuntimeError("the replica died under the request")


def test_a_replica_dying_under_a_forwarded_request_is_a_503_to_retry(tmp_path: Path) -> None:
    app = create_app(Settings(avatars_dir=tmp_path))
    front.install(app, DeadReplicas(), 1)  # type: ignore[arg-type]
    with TestClient(app) as client:
        r = client.post("/sessions/abc/interrupt")
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["code"] == "RATE_LIMIT_EXCEEDED"
