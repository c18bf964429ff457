"""The bot's HTTP app with ``AUTH_TOKEN``: its API needs the token, its pages do not; and
the bot refuses to serve beyond localhost without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from websocket_service.config import Settings
from websocket_service.pipecat.bot import parse_args, serve
from websocket_service.pipecat.server import create_bot_app

TOKEN = "s3cret-token"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    config = Settings(avatars_dir=tmp_path, auth_token=TOKEN, ice_servers=[
        {"urls": "turn:turn.example:3478", "username": "u", "credential": "c"}])
    with TestClient(create_bot_app(config, load=False)) as c:
        yield c


def test_api_needs_the_token_the_pages_do_not(client: TestClient) -> None:
    assert client.get("/", follow_redirects=True).status_code == 200
    page = client.get("/client/client.js")
    assert page.status_code == 200 and "?token=" in page.text
    for method, path in [("GET", "/api/ice-servers"), ("POST", "/start"),
                         ("POST", "/api/offer"), ("PATCH", "/api/offer"),
                         ("POST", "/sessions/x/api/offer")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
    ice = {"iceServers": [{"urls": "turn:turn.example:3478", "username": "u", "credential": "c"}]}
    assert client.get("/api/ice-servers", headers={"Authorization": f"Bearer {TOKEN}"}).json() \
        == ice
    assert client.get(f"/api/ice-servers?token={TOKEN}").json() == ice
    r = client.post("/start", headers={"Authorization": f"bearer {TOKEN}"}, json={})
    assert r.status_code == 200 and r.json()["sessionId"]


def test_serving_beyond_localhost_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="AUTH_TOKEN"):
        serve(parse_args(["--host", "0.0.0.0"]), Settings(avatars_dir=tmp_path, auth_token=None))
