"""Abuse through real sockets (security review, issue 22): idle unauthenticated sockets, parser
edges, message floods. Each test names the finding it guards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from websockets.client import ClientProtocol

from .live_server import MakeServer, rtc_server
from .rtc_client import ClientPeer
from .wsclient import Client, envelope, flatten, next_of_type, raw_ws_client

TOKEN = "s3cret"
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep
LONG_INT = '{"type": "PING", "session_id": null, "data": {"t": ' + "9" * 200_000 + "}}"


async def _closed(ws: Any, timeout: float = 10.0) -> tuple[int | None, str]:
    """Read until the server closes ``ws``; its close code and reason."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    rcvd = closed.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")


# ------------------------------------------------------------------ 3: pending sockets

async def test_idle_unauthenticated_signaling_sockets_take_no_client_slot(
        make_server: MakeServer) -> None:
    server = rtc_server(make_server, TOKEN, max_rtc_clients=2, max_pending_per_ip=5)
    url = server.ws + "/musetalk/v1/rtc/sig"
    idle = [await websockets.connect(url) for _ in range(4)]  # N + 2, never authenticating
    for ws in idle:  # each is open and answered (not refused for want of a slot)
        await ws.send(json.dumps({"type": "hello"}))
        assert (await next_of_type(ws, "error"))["code"] == "INVALID_MESSAGE"
    assert server.services.pending.count("127.0.0.1") == 4

    client = ClientPeer()
    offer = await client.offer()
    async with websockets.connect(url) as ws:  # the 5th pending socket: within the bound
        await ws.send(json.dumps({"type": "offer", "sdp": offer.sdp, "auth_token": TOKEN}))
        answer = await next_of_type(ws, "answer")
        assert answer["session_id"] and not answer["viewer"]
        await client.accept(answer["sdp"])
        await client.wait_connected()
        assert server.services.pending.count("127.0.0.1") == 4  # it is no longer pending

        async with websockets.connect(url) as late:  # 4 idle + this one: still within
            async with websockets.connect(url) as over:  # the 6th pending one is refused
                err = await next_of_type(over, "error")
                assert err["code"] == "RATE_LIMIT_EXCEEDED"
                assert err["details"] == {"max_pending_per_ip": 5}
                code, reason = await _closed(over)
                assert code == 1013 and "unauthenticated" in reason
            await late.send(json.dumps({"type": "ping", "t": 1}))  # not an offer: refused
            assert (await next_of_type(late, "error"))["code"] == "AUTH_FAILED"
        await ws.send(json.dumps({"type": "bye"}))
        await next_of_type(ws, "disconnected")
    await client.close()
    for ws in idle:
        await ws.close()


async def test_pending_sockets_are_closed_at_the_init_timeout(make_server: MakeServer) -> None:
    server = rtc_server(make_server, TOKEN, init_timeout_s=1.0)
    sig = await websockets.connect(server.ws + "/musetalk/v1/rtc/sig")
    proto = await websockets.connect(server.ws + "/musetalk/v1/ws/u1")
    for _ in range(3):  # messages other than INIT do not extend INIT's time
        await proto.send(json.dumps(envelope("PING", None, t=1)))
        assert flatten(json.loads(await proto.recv()))["type"] == "PONG"
    async def trickle() -> None:  # a client that keeps talking: the deadline still comes
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await proto.send(json.dumps(envelope("PING", None, t=2)))
                await asyncio.sleep(0.1)  # the client's pace, not a wait for the server

    talker = asyncio.create_task(trickle())
    replies = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            while True:
                replies.append(flatten(json.loads(await proto.recv())))
    await talker
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert replies[-1]["type"] == "ERROR" and replies[-1]["code"] == "INVALID_SESSION"
    assert replies[-1]["message"] == "no INIT within 1 s"
    err = await next_of_type(sig, "error")
    assert err["code"] == "AUTH_FAILED"
    code, _ = await _closed(sig)
    assert code == 1008
    assert server.services.pending.count("127.0.0.1") == 0


async def test_pending_protocol_sockets_are_bounded_per_address(make_server: MakeServer) -> None:
    server = make_server(max_pending_per_ip=2)
    url = server.ws + "/musetalk/v1/ws/"
    idle = [await websockets.connect(url + f"idle{i}") for i in range(2)]
    over = await websockets.connect(url + "over")
    err = flatten(json.loads(await over.recv()))
    assert err["type"] == "ERROR" and err["code"] == "RATE_LIMIT_EXCEEDED"
    assert err["details"] == {"max_pending_per_ip": 2}
    code, reason = await _closed(over)
    assert code == 1013 and "unauthenticated" in reason
    await idle[0].close()
    async with asyncio.timeout(10):  # its place is free once the server has seen it go
        while server.services.pending.count("127.0.0.1") > 1:
            await asyncio.sleep(0.02)
    client, reply = await Client.connect(server.ws, user_id="real")
    assert reply is not None and reply["type"] == "INIT_SUCCESS"
    assert server.services.pending.count("127.0.0.1") == 1  # INIT done: no longer pending
    await client.close()
    await idle[1].close()


# ------------------------------------------------------------------ 7: parser edges

async def test_deep_json_and_long_numbers_are_invalid_messages(make_server: MakeServer) -> None:
    server = make_server()
    client, reply = await Client.connect(server.ws)
    assert reply is not None and reply["type"] == "INIT_SUCCESS"
    client.decode = False
    for bad in (DEEP, LONG_INT):
        await client.send(bad)
        err = await client.error()
        assert err["code"] == "INVALID_MESSAGE", err
        assert "not valid JSON" in err["message"]
        await client.msg("PING", t=3)  # the connection still works
        assert (await client.recv_until(lambda m: m["type"] == "PONG"))["t"] == 3
    await client.close()


async def test_deep_json_and_long_numbers_on_the_signaling_socket(make_server: MakeServer) -> None:
    server = make_server()
    async with websockets.connect(server.ws + "/musetalk/v1/rtc/sig", max_size=2**22) as ws:
        # as sent (over the signaling size limit), and cut to fit under it
        for bad in (DEEP, LONG_INT, "[" * 30_000 + "]" * 30_000, "9" * 60_000):
            await ws.send(bad)
            err = await next_of_type(ws, "error")
            assert err["code"] == "INVALID_MESSAGE", err
            await ws.send(json.dumps({"type": "ping", "t": 4}))
            assert (await next_of_type(ws, "pong"))["t"] == 4


async def test_deep_json_and_long_numbers_on_the_bridge_socket(make_server: MakeServer) -> None:
    server = make_server()
    owner, reply = await Client.connect(server.ws)
    assert reply is not None and reply["type"] == "INIT_SUCCESS"
    async with websockets.connect(
            f"{server.ws}/musetalk/v1/bridge/{owner.session_id}") as br:
        for bad in (DEEP, LONG_INT):
            await br.send(bad)
            err = flatten(json.loads(await br.recv()))
            assert err["type"] == "ERROR" and err["code"] == "INVALID_MESSAGE", err
            await br.send(json.dumps(envelope("BRIDGE_CONFIG", owner.session_id,
                                              format="rgb24")))
            assert flatten(json.loads(await br.recv()))["type"] == "BRIDGE_READY"
    await owner.close()


# ------------------------------------------------------------------ 8a: floods

#: big all-keyframe frames: a reader's socket carries a lot besides the replies
BIG_FRAMES = {"resolution": "1024x1024", "gop_seconds": 0.04, "bitrate": 20_000_000}


def _flood(session_id: str, n: int = 1000) -> list[str]:
    """PINGs and STATE_CHANGEs, each answered (PONG, STATE_CHANGED), as the attacker sent."""
    return [json.dumps(envelope("PING", session_id, t=i)) if i % 2 else
            json.dumps(envelope("STATE_CHANGE", session_id, target_state="idle"))
            for i in range(n)]


async def _flood_and_read(client: Client, msgs: list[str],
                          done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Send ``msgs`` as fast as the socket takes them while reading everything; the replies
    (no frames) once ``done`` holds for them."""
    async def send() -> None:
        for m in msgs:
            await client.send(m)

    sender = asyncio.create_task(send())
    replies: list[dict[str, Any]] = []
    try:
        while not done(replies):
            replies.append(await client.recv_until(
                lambda m: m["type"] in ("PONG", "STATE_CHANGED", "ERROR"), timeout=30))
    finally:
        await sender
    return replies


async def _still_streams(client: Client) -> None:
    await client.recv_frames(10, timeout=10)


async def test_a_flooding_client_that_reads_is_answered_not_closed(make_server: MakeServer) -> None:
    server = make_server()
    client, reply = await Client.connect(server.ws, video_config=BIG_FRAMES)
    assert reply is not None and reply["type"] == "INIT_SUCCESS"
    client.decode = False
    replies = await _flood_and_read(client, _flood(client.session_id), lambda r: len(r) >= 1000)
    assert [r["t"] for r in replies if r["type"] == "PONG"] == list(range(1, 1000, 2))
    assert sum(r["type"] == "STATE_CHANGED" for r in replies) == 500
    await _still_streams(client)
    await client.close()


async def test_a_flood_over_the_rate_limit_gets_few_errors_with_counts(
        make_server: MakeServer) -> None:
    server = make_server(max_messages_per_s=50, message_burst=100)
    client, reply = await Client.connect(server.ws)
    assert reply is not None and reply["type"] == "INIT_SUCCESS"
    client.decode = False

    def accounted(replies: list[dict[str, Any]]) -> bool:
        return sum(r["details"].get("dropped", 1) if r["type"] == "ERROR" else 1
                   for r in replies) >= 1000

    replies = await _flood_and_read(client, _flood(client.session_id), accounted)
    errors = [r for r in replies if r["type"] == "ERROR"]
    answered = len(replies) - len(errors)
    assert {e["code"] for e in errors} == {"RATE_LIMIT_EXCEEDED"}
    dropped = sum(e["details"]["dropped"] for e in errors)
    assert answered + dropped == 1000 and dropped > 500
    assert len(errors) < dropped / 10  # coalesced: one error a second, not one per message
    metrics = server.get("/metrics").text.splitlines()
    assert f"avatar_messages_rate_limited_total {float(dropped)}" in metrics
    await _still_streams(client)
    await client.close()


async def test_a_flooding_client_that_stops_reading_is_closed(make_server: MakeServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The counterpart: one that floods and never reads is still closed as not reading."""
    server = make_server(send_stall_s=1.0)
    session_id = str(uuid.uuid4())
    sock, proto = raw_ws_client(server.settings.port, "/musetalk/v1/ws/flood", timeout=20)
    # big all-keyframe frames, so that its socket buffers fill at once
    _send(sock, proto, envelope("INIT", session_id, user_id="flood", video_config={
        "resolution": "1024x1024", "gop_seconds": 0.04, "bitrate": 20_000_000}))
    try:
        sessions = server.services.sessions.sessions
        async with asyncio.timeout(20):  # its buffers are full once its frames are dropped
            while not (session_id in sessions and sessions[session_id].stats.frames_dropped):
                await asyncio.sleep(0.05)
        for m in _flood(session_id):
            _send(sock, proto, m)
        async with asyncio.timeout(20):  # closed once the stall is seen: the session ends
            while session_id in sessions:
                await asyncio.sleep(0.05)
        assert "client not reading" in caplog.text
    finally:
        sock.close()


def _send(sock: socket.socket, proto: ClientProtocol, msg: dict[str, Any] | str) -> None:
    proto.send_text((msg if isinstance(msg, str) else json.dumps(msg)).encode())
    sock.sendall(b"".join(proto.data_to_send()))


async def test_a_viewer_that_stops_reading_is_closed_while_its_owner_floods(
        make_server: MakeServer, caplog: pytest.LogCaptureFixture) -> None:
    """Events for a reader whose socket is blocked stay bounded even if it sends nothing."""
    server = make_server()
    owner, reply = await Client.connect(server.ws, video_config=BIG_FRAMES)
    assert reply is not None and reply["type"] == "INIT_SUCCESS"
    owner.decode = False
    sock, proto = raw_ws_client(server.settings.port, "/musetalk/v1/ws/u1", timeout=20)
    _send(sock, proto, envelope("INIT", owner.session_id, user_id="u1", viewer=True))
    try:
        feed = server.services.feeds[owner.session_id]
        await owner.recv_until_holds(  # the viewer's buffers are full: its frames drop
            lambda: len(feed.outboxes) == 2 and bool(feed.outboxes[1].dropped), 20,
            "the viewer's frames to drop")
        replies = await _flood_and_read(owner, _flood(owner.session_id), lambda r: len(r) >= 1000)
        assert len(replies) == 1000
        await owner.recv_until_holds(  # the viewer is disconnected, the owner streams on
            lambda: len(feed.outboxes) == 1, 20, "the viewer to be disconnected")
        assert "client not reading" in caplog.text
        await _still_streams(owner)
    finally:
        sock.close()
        await owner.close()
