"""AUTH_TOKEN end to end: every REST route, /offer, the signaling socket and the demo page."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from .browser import chromium
from .live_server import LiveServer, MakeServer, rtc_server
from .rtc_client import ClientPeer
from .support import face_photo
from .wsclient import Client, next_of_type

TOKEN = "s3cret"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
BAD_HEADERS: list[dict[str, str]] = [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
]


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.request.url, r.status_code, r.text)
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert body["code"] == "AUTH_FAILED" and body["message"] and body["details"] == {}


async def _call(http: httpx.AsyncClient, route: tuple[str, str, dict[str, Any]],
                headers: dict[str, str]) -> httpx.Response:
    method, path, kwargs = route
    return await http.request(method, path, headers=headers, **kwargs)


async def test_every_protected_rest_route_needs_the_bearer_token(make_server: MakeServer,
                                                                 tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    face_photo(media / "still.png")
    server = make_server(auth_token=TOKEN, media_root=media)
    ws_client, reply = await Client.connect(server.ws, auth_token=TOKEN)
    assert reply is not None and reply["type"] == "INIT_SUCCESS"
    sid = ws_client.session_id
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/sessions", {}),
        ("GET", f"/sessions/{sid}", {}),
        ("GET", "/avatars", {}),
        ("GET", "/avatars/default", {}),
        ("POST", "/prepare_avatar/bob", {"data": {"path": "still.png"}}),
        ("POST", f"/sessions/{sid}/audio", {"content": b"\x00\x01" * 3200}),
        ("POST", f"/sessions/{sid}/action/nod", {}),
        ("POST", f"/sessions/{sid}/interrupt", {}),
        ("POST", f"/sessions/{sid}/end_of_speech", {}),
        ("POST", f"/sessions/{sid}/view_token", {}),
    ]
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        for route in [*routes, ("GET", "/jobs/whatever", {})]:
            for headers in BAD_HEADERS:
                _refused(await _call(http, route, headers))
        assert server.services.store.running_jobs() == 0  # refused requests changed nothing
        assert server.services.sessions.get(sid).describe()["state"] == "idle"

        ok = {route[1]: await _call(http, route, GOOD) for route in routes}
        assert all(r.status_code in (200, 202) for r in ok.values()), \
            {p: (r.status_code, r.text) for p, r in ok.items()}
        assert ok["/sessions"].json()["count"] == 1
        job = await http.get(ok["/prepare_avatar/bob"].json()["status_url"], headers=GOOD)
        assert job.status_code == 200 and job.json()["avatar_id"] == "bob"
        # with the token the service's other errors come through as before
        missing = await http.get("/jobs/whatever", headers=GOOD)
        assert missing.status_code == 404 and missing.json()["code"] == "MODEL_NOT_FOUND"
    await ws_client.close()


async def test_open_routes_stay_open_and_openapi_describes_the_scheme(make_server: MakeServer) -> None:
    server = make_server(auth_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        for path in ("/", "/health", "/docs", "/openapi.json", "/openapi.yaml", "/static/app.js",
                     "/static/auth.js", "/samples/speech.wav"):
            r = await http.get(path)
            assert r.status_code == 200, (path, r.status_code)
        schema = (await http.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    secured = {(m, p) for p, ops in schema["paths"].items() for m, op in ops.items()
               if op.get("security")}
    assert ("get", "/sessions") in secured and ("post", "/offer") in secured
    assert ("get", "/health") not in secured


async def test_without_a_token_configured_nothing_asks_for_one(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        assert (await http.get("/sessions")).status_code == 200
        assert (await http.get("/sessions", headers={"Authorization": "Bearer anything"})).status_code == 200


async def _answer_and_connect(client: ClientPeer, sdp: str) -> None:
    await client.accept(sdp)
    await client.wait_connected()
    assert client.pc.connectionState == "connected"


async def test_offer_needs_the_token_as_header_or_in_the_body(make_server: MakeServer) -> None:
    server = rtc_server(make_server, TOKEN)
    async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
        for headers, body_token in [({}, None), ({}, "wrong"), ({"Authorization": "Bearer wrong"}, None)]:
            client = ClientPeer()
            offer = await client.offer()
            body = {"sdp": offer.sdp, "type": "offer", "user_id": "py", "auth_token": body_token}
            _refused(await http.post("/offer", json=body, headers=headers))
            await client.close()
        assert server.services.sessions.sessions == {}

        for headers, body_token in [({}, TOKEN), (GOOD, None)]:
            client = ClientPeer()
            offer = await client.offer()
            body = {"sdp": offer.sdp, "type": "offer", "user_id": "py", "auth_token": body_token}
            r = await http.post("/offer", json=body, headers=headers)
            assert r.status_code == 200, r.text
            await _answer_and_connect(client, r.json()["sdp"])
            await client.close()


async def _expect_refusal(ws: Any) -> None:
    err = await next_of_type(ws, "error")
    assert err["code"] == "AUTH_FAILED", err
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1008


async def test_signaling_needs_the_token_in_the_url_or_the_first_offer(make_server: MakeServer) -> None:
    server = rtc_server(make_server, TOKEN, init_timeout_s=1.5)
    url = server.ws + "/musetalk/v1/rtc/sig"
    client = ClientPeer()
    offer = await client.offer()

    async with websockets.connect(url + "?token=wrong") as ws:
        await _expect_refusal(ws)
    async with websockets.connect(url) as ws:  # the first message must be an offer
        await ws.send(json.dumps({"type": "ping", "t": 1}))
        await _expect_refusal(ws)
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "offer", "sdp": offer.sdp, "auth_token": "wrong"}))
        await _expect_refusal(ws)
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "offer", "sdp": offer.sdp}))
        await _expect_refusal(ws)
    async with websockets.connect(url) as ws:  # silence is refused after INIT's timeout
        await _expect_refusal(ws)
    async with websockets.connect(url) as ws:  # and so is garbage: it does not extend the wait
        async with asyncio.timeout(4):
            while True:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(json.dumps({"type": "hello"}))
                err = await next_of_type(ws, "error")
                if err["code"] == "AUTH_FAILED":
                    break
                assert err["code"] == "INVALID_MESSAGE"
                await asyncio.sleep(0.4)
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1008
    assert server.services.sessions.sessions == {}

    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "offer", "sdp": offer.sdp, "auth_token": TOKEN}))
        answer = await next_of_type(ws, "answer")
        await _answer_and_connect(client, answer["sdp"])
        await ws.send(json.dumps({"type": "ping", "t": 7}))
        assert (await next_of_type(ws, "pong"))["t"] == 7
        await ws.send(json.dumps({"type": "bye"}))
        await next_of_type(ws, "disconnected")
    await client.close()

    client = ClientPeer()
    offer = await client.offer()
    async with websockets.connect(f"{url}?token={TOKEN}") as ws:
        await ws.send(json.dumps({"type": "ping", "t": 8}))
        assert (await next_of_type(ws, "pong"))["t"] == 8
        await ws.send(json.dumps({"type": "offer", "sdp": offer.sdp}))
        await _answer_and_connect(client, (await next_of_type(ws, "answer"))["sdp"])
    await client.close()


@pytest.mark.parametrize("transport,counter", [("ws", "wsFramesDecoded"),
                                               ("webrtc", "webrtcFramesDecoded")])
def test_demo_page_sends_the_token_from_its_url(make_server: MakeServer, transport: str,
                                                counter: str) -> None:
    server = rtc_server(make_server, TOKEN)
    with chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.http}/?token={TOKEN}")
        page.check(f"input[name=transport][value={transport}]")
        page.click("#connect")
        page.wait_for_function(f"window.__stats.{counter} > 50", timeout=15_000)
        # the action buttons come from GET /sessions/{id} and /avatars/{id}, both protected
        page.locator("#actions button[data-action=nod]").wait_for(timeout=5_000)
        page.click("#actions button[data-action=nod]")
        page.wait_for_function("window.__stats.errors.length === 0", timeout=1_000)
        stats = page.evaluate("window.__stats")
        page.click("#disconnect")
    assert not errors, errors
    assert not stats["errors"], stats["errors"]


def test_metrics_stay_open_for_scrapers(make_server):
    server = make_server(auth_token="s3cret")
    r = server.get("/metrics")
    assert r.status_code == 200 and "avatar_sessions 0" in r.text
