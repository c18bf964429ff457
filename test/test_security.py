"""JWT auth, the Origin allow-list, per-user/per-address session limits and the message rate
limit, all through a real socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .live_server import LiveServer, MakeServer
from .support import jwt_token
from .wsclient import Client, envelope, flatten

SECRET = "a-jwt-secret-of-at-least-32-bytes!!"


def _pem(private: Any) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


async def _init(server: LiveServer, token: str | None, user_id: str = "u1") -> tuple[Client, dict]:
    client, reply = await Client.connect(server.ws, user_id=user_id, auth_token=token)
    assert reply is not None
    return client, reply


async def _refused(server: LiveServer, token: str | None, reason: str | None) -> None:
    client, reply = await _init(server, token)
    assert reply["type"] == "ERROR" and reply["code"] == "AUTH_FAILED", reply
    assert reply["details"].get("reason") == reason
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_hs256_jwt_with_matching_subject_is_accepted(make_server: MakeServer) -> None:
    server = make_server(jwt_secret=SECRET)
    client, reply = await _init(server, jwt_token(SECRET))
    assert reply["type"] == "INIT_SUCCESS"
    await client.close()


async def test_jwt_expired_wrong_subject_wrong_key_or_missing_is_refused(
        make_server: MakeServer) -> None:
    server = make_server(jwt_secret=SECRET)
    await _refused(server, jwt_token(SECRET, exp_in=-5), "expired")
    await _refused(server, jwt_token(SECRET, sub="someone-else"), "subject")
    await _refused(server, jwt_token("another-secret-of-at-least-32-bytes"), None)
    await _refused(server, jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256"), None)  # no exp
    await _refused(server, None, None)
    await _refused(server, "not-a-jwt", None)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_public_key_jwts(make_server: MakeServer, alg: str) -> None:
    private = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS256"
               else ec.generate_private_key(ec.SECP256R1()))
    server = make_server(jwt_public_key=_pem(private).replace("\n", "\\n"))  # one .env line
    client, reply = await _init(server, jwt_token(private, alg=alg))
    assert reply["type"] == "INIT_SUCCESS"
    await client.close()
    await _refused(server, jwt_token(SECRET), None)  # HS256 is not accepted with a public key


async def test_static_token_still_works_next_to_jwts(make_server: MakeServer) -> None:
    server = make_server(jwt_secret=SECRET, auth_token="static-token")
    for token in ("static-token", jwt_token(SECRET)):
        client, reply = await _init(server, token)
        assert reply["type"] == "INIT_SUCCESS"
        await client.close()
    async with httpx.AsyncClient(base_url=server.http) as http:
        ok = await http.get("/sessions", headers={"Authorization": f"Bearer {jwt_token(SECRET)}"})
        bad = await http.get("/sessions", headers={"Authorization": "Bearer nope"})
    assert ok.status_code == 200 and bad.status_code == 401


async def test_origin_allow_list(make_server: MakeServer) -> None:
    server = make_server(allowed_origins=["https://app.example"])
    url = f"{server.ws}/musetalk/v1/ws/u1"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(f"{server.ws}/musetalk/v1/rtc/u1", origin="https://evil.example")
    for origin in ("https://app.example", None):  # no Origin: not a browser
        ws = await websockets.connect(url, origin=origin)
        await ws.send(json.dumps(envelope("INIT", None, user_id="u1")))
        assert flatten(json.loads(await ws.recv()))["type"] == "INIT_SUCCESS"
        await ws.close()


async def _limit_refusal(server: LiveServer, user_id: str, key: str) -> None:
    client, reply = await _init(server, None, user_id=user_id)
    assert reply["type"] == "ERROR" and reply["code"] == "RATE_LIMIT_EXCEEDED", reply
    assert key in reply["details"]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


async def test_per_user_and_per_address_session_limits(make_server: MakeServer) -> None:
    server = make_server(max_sessions_per_user=2, max_sessions_per_ip=3)
    first = [await _init(server, None, user_id="a") for _ in range(2)]
    assert all(reply["type"] == "INIT_SUCCESS" for _, reply in first)
    await _limit_refusal(server, "a", "max_sessions_per_user")
    other, reply = await _init(server, None, user_id="b")
    assert reply["type"] == "INIT_SUCCESS"
    await _limit_refusal(server, "c", "max_sessions_per_ip")  # all come from 127.0.0.1
    await first[0][0].msg("CLOSE")
    await first[0][0].recv_until(lambda m: m["type"] == "CLOSE_ACK")
    await first[0][0].close()
    # the slot is free once the server has torn the session down
    sessions = server.services.sessions
    async with asyncio.timeout(10):
        while len(sessions.sessions) > 2:
            await asyncio.sleep(0.02)
    again, reply = await _init(server, None, user_id="a")
    assert reply["type"] == "INIT_SUCCESS"
    for c in (first[1][0], other, again):
        await c.close()


async def test_message_rate_limit_drops_messages_and_the_stream_goes_on(
        make_server: MakeServer) -> None:
    server = make_server(max_messages_per_s=0.5, message_burst=10)
    client, reply = await _init(server, None)
    assert reply["type"] == "INIT_SUCCESS"
    client.decode = False
    for t in range(30):
        await client.msg("PING", t=t)
    pongs, errors = [], []
    while len(pongs) + sum(e["details"]["dropped"] for e in errors) < 30:
        m = await client.recv_until(lambda m: m["type"] in ("PONG", "ERROR"))
        (pongs if m["type"] == "PONG" else errors).append(m)
    # the burst (9 after INIT took one) got through, the rest not (one refill per 2 s); the
    # drops are reported at most once a second, each report with its count
    dropped = 30 - len(pongs)
    assert 9 <= len(pongs) <= 11 and sum(e["details"]["dropped"] for e in errors) == dropped
    assert {e["code"] for e in errors} == {"RATE_LIMIT_EXCEEDED"} and len(errors) < dropped
    assert errors[0]["details"] == {"max_messages_per_s": 0.5, "message_burst": 10, "dropped": 1}
    await client.recv_frames(5)  # the session keeps streaming
    metrics = server.get("/metrics").text.splitlines()
    assert f"avatar_messages_rate_limited_total {float(dropped)}" in metrics
    await client.close()
