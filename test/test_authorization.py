"""Every session belongs to its user: another user's valid token reaches none of it (issue 22,
findings 1, 2 and 4), through the real app on real sockets.

User A streams a session; user B holds a valid JWT of its own. B must get AUTH_FAILED (403 over
HTTP, close 1008 on a socket) for A's session on every surface, exactly as for an id that does
not exist, while A (and the holder of A's view grant) keeps every right.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import httpx
import pytest
import websockets

from websocket_service.errors import RateLimitExceeded

from .live_server import LiveServer, MakeServer
from .rtc_client import ClientPeer
from .support import jwt_token
from .wsclient import Client, flatten

SECRET = "a-jwt-secret-of-at-least-32-bytes!!"
NOWHERE = "00000000-0000-0000-0000-000000000000"
_token = functools.partial(jwt_token, SECRET, exp_in=600)  # a user's token, by name


def _bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {_token(sub)}"}


def _server(make_server: MakeServer, **kw: Any) -> LiveServer:
    return make_server(jwt_secret=SECRET, rtc_host_addresses=["127.0.0.1"], default_width=128,
                       default_height=128, **kw)


def _not_yours(r: httpx.Response, ident: str, kind: str = "session") -> dict[str, Any]:
    assert r.status_code == 403, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert body["code"] == "AUTH_FAILED", body
    assert body["details"] == {f"{kind}_id": ident, "reason": "not_owner"}, body
    return body


async def _owner(server: LiveServer, user: str = "alice") -> Client:
    client, reply = await Client.connect(server.ws, user_id=user, auth_token=_token(user))
    assert reply is not None and reply["type"] == "INIT_SUCCESS", reply
    client.decode = False
    return client


async def _socket_refusal(url: str, first: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one error a socket answers before closing 1008."""
    async with websockets.connect(url) as ws:
        if first is not None:
            await ws.send(json.dumps(first))
        while True:
            msg = json.loads(await ws.recv())
            if "data" in msg:  # an envelope (mic, bridge); signaling is flat
                msg = flatten(msg)
            if msg["type"] in ("ERROR", "error"):
                break
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await ws.recv()
        assert ws.close_code == 1008
        return msg


async def test_another_users_token_reaches_nothing_of_a_session(make_server: MakeServer) -> None:
    server = _server(make_server)
    alice = await _owner(server)
    sid = alice.session_id
    b = _bearer("bob")
    async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
        # listing: bob sees none of alice's sessions, alice sees hers
        r = await http.get("/sessions", headers=b)
        assert r.status_code == 200 and r.json()["count"] == 0 and r.json()["sessions"] == []
        r = await http.get("/sessions", headers=_bearer("alice"))
        assert [s["session_id"] for s in r.json()["sessions"]] == [sid]
        # reading and controlling: the same answer as for an id that does not exist
        for method, path in [("GET", ""), ("POST", "/action/action_0"), ("POST", "/interrupt"),
                             ("POST", "/end_of_speech"), ("POST", "/recording"),
                             ("DELETE", "/recording"), ("POST", "/view_token")]:
            theirs = _not_yours(await http.request(method, f"/sessions/{sid}{path}", headers=b), sid)
            none = _not_yours(await http.request(method, f"/sessions/{NOWHERE}{path}", headers=b),
                              NOWHERE)
            assert theirs["message"].replace(sid, "?") == none["message"].replace(NOWHERE, "?")
        r = await http.post(f"/sessions/{sid}/audio", headers=b, content=b"\0\0" * 640)
        _not_yours(r, sid)
        assert server.services.sessions.get(sid).stats.audio_samples == 0  # nothing was said
        # alice may do all of it
        r = await http.post(f"/sessions/{sid}/audio", headers=_bearer("alice"),
                            content=b"\0\0" * 640)
        assert r.status_code == 202, r.text
        assert (await http.get(f"/sessions/{sid}", headers=_bearer("alice"))).json()[
            "session_id"] == sid

        # watching: a WebSocket viewer, POST /offer, a signaling viewer
        bob_view, reply = await Client.watch(server.ws, "bob", sid, decode=False,
                                                auth_token=_token("bob"))
        assert reply["type"] == "ERROR" and reply["code"] == "AUTH_FAILED"
        assert reply["details"] == {"session_id": sid, "reason": "not_owner"}
        await bob_view.close()
        peer = ClientPeer()
        offer = await peer.offer()
        r = await http.post("/offer", headers=b, json={"sdp": offer.sdp, "type": "offer",
                                                       "session_id": sid})
        _not_yours(r, sid)
        err = await _socket_refusal(
            f"{server.ws}/musetalk/v1/rtc/bob",
            {"type": "offer", "sdp": offer.sdp, "session_id": sid, "auth_token": _token("bob")})
        assert err["code"] == "AUTH_FAILED" and err["details"]["reason"] == "not_owner"
        await peer.close()
        assert server.services.sessions.viewer_count() == 0

        # the session's media sockets: microphone out and media bridge
        for kind in ("mic", "bridge"):
            for target in (sid, NOWHERE):
                err = await _socket_refusal(
                    f"{server.ws}/musetalk/v1/{kind}/{target}?token={_token('bob')}")
                assert err["code"] == "AUTH_FAILED"
                assert err["details"] == {"session_id": target, "reason": "not_owner"}
    await alice.close()


async def test_recordings_belong_to_the_sessions_user(make_server: MakeServer, tmp_path) -> None:
    server = _server(make_server, recordings_dir=tmp_path / "rec")
    alice = await _owner(server)
    sid = alice.session_id
    a, b = _bearer("alice"), _bearer("bob")
    async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
        r = await http.post(f"/sessions/{sid}/recording", headers=a)
        assert r.status_code == 201, r.text
        rid = r.json()["recording_id"]
        await alice.recv_frames(10)  # some frames into the file
        _not_yours(await http.delete(f"/sessions/{sid}/recording", headers=b), sid)
        r = await http.delete(f"/sessions/{sid}/recording", headers=a)
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        assert [x["recording_id"] for x in (await http.get("/recordings", headers=a)).json()[
            "recordings"]] == [rid]
        assert (await http.get("/recordings", headers=b)).json()["recordings"] == []
        _not_yours(await http.get(f"/recordings/{rid}", headers=b), rid, "recording")
        _not_yours(await http.get(f"/recordings/{'f' * 32}", headers=b), "f" * 32, "recording")
        r = await http.get(f"/recordings/{rid}", headers=a)
        assert r.status_code == 200 and r.content[4:8] == b"ftyp"
    await alice.close()


async def test_server_side_sessions_are_opened_and_stopped_by_their_user(
        make_server: MakeServer) -> None:
    server = _server(make_server)
    async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
        r = await http.post("/api/webrtc/realtime/start", params={"user_id": "alice"},
                            headers=_bearer("bob"))
        assert r.status_code == 401 and r.json()["details"] == {"reason": "subject"}, r.text
        assert server.services.sessions.sessions == {}
        r = await http.post("/api/webrtc/realtime/start", headers=_bearer("bob"))
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        assert server.services.sessions.get(sid).user_id == "bob"  # the token's subject
        stop = "/api/webrtc/realtime/stop"
        _not_yours(await http.post(stop, params={"session_id": sid}, headers=_bearer("alice")), sid)
        r = await http.post(stop, params={"session_id": sid}, headers=_bearer("bob"))
        assert r.status_code == 200 and r.json()["status"] == "stopped"


async def test_a_view_grant_lets_its_holder_watch_and_nothing_more(make_server: MakeServer) -> None:
    server = _server(make_server)
    alice = await _owner(server)
    sid = alice.session_id
    async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
        r = await http.post(f"/sessions/{sid}/view_token", headers=_bearer("alice"))
        assert r.status_code == 200, r.text
        grant = r.json()["view_token"]
        # a guest with no account of its own watches with the grant alone
        guest, reply = await Client.watch(server.ws, "guest", sid, decode=False,
                                          auth_token=grant)
        assert reply["type"] == "INIT_SUCCESS" and reply["viewer"] is True
        await guest.recv_frames(3)
        await guest.msg("INTERRUPT")  # receive-only
        assert (await guest.error())["code"] == "INVALID_SESSION"
        # the grant is for watching this session: it opens nothing and controls nothing
        r = await http.post(f"/sessions/{sid}/interrupt",
                            headers={"Authorization": f"Bearer {grant}"})
        assert r.status_code == 401
        other, reply = await Client.connect(server.ws, user_id="guest", auth_token=grant)
        assert reply is not None and reply["code"] == "AUTH_FAILED"
        await other.close()
        peer = ClientPeer()
        offer = await peer.offer()
        r = await http.post("/offer", json={"sdp": offer.sdp, "type": "offer",
                                            "session_id": sid, "auth_token": grant})
        assert r.status_code == 200 and r.json()["viewer"] is True, r.text
        async with websockets.connect(f"{server.ws}/musetalk/v1/rtc/guest") as sig:
            await sig.send(json.dumps({"type": "offer", "sdp": offer.sdp, "session_id": sid,
                                       "auth_token": grant}))
            answer = json.loads(await sig.recv())
            assert answer["type"] == "answer" and answer["viewer"] is True, answer
            await sig.send(json.dumps({"type": "offer", "sdp": offer.sdp, "auth_token": grant}))
            refused = json.loads(await sig.recv())  # a session of its own: not with a grant
            while refused["type"] != "error":
                refused = json.loads(await sig.recv())
            assert refused["code"] == "AUTH_FAILED", refused
        await peer.close()
        # revoked: new viewers are refused, the one watching stays
        r = await http.delete(f"/sessions/{sid}/view_token", headers=_bearer("alice"))
        assert r.json()["revoked"] is True
        late, reply = await Client.watch(server.ws, "guest", sid, decode=False,
                                         auth_token=grant)
        assert reply["code"] == "AUTH_FAILED"
        await late.close()
        await guest.recv_frames(3)
    await guest.close()
    await alice.close()


async def test_metrics_name_no_session_unless_protected(make_server: MakeServer) -> None:
    server = _server(make_server)
    alice = await _owner(server)
    text = server.get("/metrics").text
    assert "avatar_sessions 1.0" in text
    assert alice.session_id not in text and 'session="' not in text
    await alice.close()

    server = _server(make_server, metrics_token="scrape-me")
    alice = await _owner(server)
    assert server.get("/metrics").status_code == 401
    r = httpx.get(server.http + "/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert r.status_code == 200 and f'avatar_session_fps{{session="{alice.session_id}"}}' in r.text
    await alice.close()


async def test_viewers_have_limits_per_address_per_session_and_in_all(
        make_server: MakeServer) -> None:
    server = make_server(max_viewers_per_ip=2, max_viewers_per_session=5, max_viewers=10,
                         max_sessions_per_ip=1)
    owner, _ = await Client.connect(server.ws, user_id="owner")
    owner.decode = False

    async def view(user: str) -> tuple[Client, dict[str, Any]]:
        return await Client.watch(server.ws, user, owner.session_id, decode=False,
                                  auth_token=None)

    first, r1 = await view("v1")
    second, r2 = await view("v2")
    assert r1["type"] == r2["type"] == "INIT_SUCCESS"
    third, r3 = await view("v3")
    assert r3["type"] == "ERROR" and r3["code"] == "RATE_LIMIT_EXCEEDED"
    assert r3["details"] == {"max_viewers_per_ip": 2}
    with pytest.raises(websockets.ConnectionClosed):
        await third.ws.recv()
    assert third.ws.close_code == 1013
    peer = ClientPeer()  # WebRTC viewers count in the same limits
    offer = await peer.offer()
    r = httpx.post(server.http + "/offer", json={"sdp": offer.sdp, "type": "offer",
                                                 "session_id": owner.session_id}, timeout=20)
    assert r.status_code == 429 and r.json()["details"] == {"max_viewers_per_ip": 2}
    await peer.close()
    await first.close()  # a viewer that leaves gives its place back
    await second.recv_until_holds(lambda: server.services.sessions.viewer_count() == 1, 5,
                                  "the viewer's place back")
    again, r4 = await view("v4")
    assert r4["type"] == "INIT_SUCCESS"
    for c in (again, second, owner):
        await c.close()


def test_viewer_limits_count_per_session_and_in_all(make_server: MakeServer) -> None:
    mgr = make_server(max_viewers_per_ip=0, max_viewers_per_session=2,
                      max_viewers=3).services.sessions
    keys = [mgr.admit_viewer("s1", f"10.0.0.{i}") for i in range(2)]
    with pytest.raises(RateLimitExceeded) as per_session:
        mgr.admit_viewer("s1", "10.0.0.9")
    assert per_session.value.details == {"max_viewers_per_session": 2}
    keys.append(mgr.admit_viewer("s2", "10.0.0.9"))
    with pytest.raises(RateLimitExceeded) as in_all:
        mgr.admit_viewer("s2", "10.0.0.10")
    assert in_all.value.details == {"max_viewers": 3}
    mgr.release_viewer(keys[0])
    mgr.release_viewer(keys[0])  # idempotent
    mgr.admit_viewer("s2", "10.0.0.10")
    assert mgr.viewer_count() == 3
