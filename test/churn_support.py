"""Sessions opened and closed the ways clients end them, and counts of what a server holds.

Shared by ``test/test_churn.py`` (a few hundred sessions, asserting counts) and
``bench/churn.py`` (thousands, reporting RSS).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
from collections import Counter
from typing import Any

import httpx

from websocket_service.engines.geometric.stream import GeometricStream
from websocket_service.feed import Outbox, SessionFeed
from websocket_service.media.encoder import H264Encoder
from websocket_service.media.encoder_pool import InProcessEncoder
from websocket_service.playout import Playout
from websocket_service.producer import Producer
from websocket_service.session import Session
from websocket_service.states import StateMachine
from websocket_service.transports.rtc_audio_in import MicIngest
from websocket_service.transports.rtc_tracks import SessionAudioTrack, SessionVideoTrack
from websocket_service.transports.signaling import SignalingConnection
from websocket_service.transports.webrtc import RtcPeer, RtcSink
from websocket_service.transports.websocket import Connection

from .live_server import LiveServer
from .rtc_client import ClientPeer
from .wsclient import Client

#: the ways a session ends, cycled through in order
KINDS = ("close_msg", "drop", "speech_close", "speech_abort", "action_close", "action_drop",
         "abort", "no_init")

#: classes whose live instances must not outlast their session
TRACKED: tuple[type, ...] = (
    Session, Connection, SessionFeed, Outbox, InProcessEncoder, H264Encoder, GeometricStream,
    Playout, Producer, StateMachine, RtcPeer, RtcSink, SessionVideoTrack, SessionAudioTrack,
    MicIngest, SignalingConnection)

PCM_1S = b"\x10\x00\xf0\xff" * 8000  # 1 s of a quiet square wave: the mouth moves


def _abort(client: Client) -> None:
    """Drop the TCP connection without a closing handshake, like a client that crashed."""
    client.ws.transport.abort()


async def one_session(server: LiveServer, k: int) -> str:
    """Open session ``k`` and end it the ``KINDS[k % len(KINDS)]`` way."""
    kind = KINDS[k % len(KINDS)]
    client, reply = await Client.connect(server.ws, user_id=f"churn{k % 5}", init=kind != "no_init")
    client.decode = False
    if kind == "no_init":
        await client.close()
        return kind
    assert reply is not None and reply["type"] == "INIT_SUCCESS", reply
    if kind.startswith("speech"):
        for i in range(0, len(PCM_1S), 1280):
            await client.send(bytes(PCM_1S[i : i + 1280]))
        await client.recv_until(lambda m: m["type"] == "STATE_CHANGED"
                                and m["current_state"] == "speaking")
    elif kind.startswith("action"):
        await client.msg("ACTION", action_index=1)
        await client.recv_until(lambda m: m["type"] == "STATE_CHANGED"
                                and m["current_state"] == "action")
    else:  # idle: the first frame
        while not client.frames:
            client._take(json.loads(await client.ws.recv()))
    if kind.endswith("close") or kind == "close_msg":
        await client.msg("CLOSE")
        await client.recv_until(lambda m: m["type"] == "CLOSE_ACK")
        await client.close()
    elif kind.endswith("abort"):
        _abort(client)
    else:
        await client.close()
    return kind


async def rtc_session(server: LiveServer) -> str:
    """A WebRTC session (POST /offer) that connects, then hangs up."""
    async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
        client = ClientPeer()
        offer = await client.offer()
        r = await http.post("/offer", json={"sdp": offer.sdp, "type": offer.type,
                                            "user_id": "rtc"})
        assert r.status_code == 200, r.text
        await client.accept(r.json()["sdp"])
        await client.wait_connected()
        await client.close()
    return "webrtc"


async def churn(server: LiveServer, n: int, start: int = 0, parallel: int = 4,
                rtc_every: int = 0) -> Counter[str]:
    """``n`` sessions, ``parallel`` at a time; every ``rtc_every``-th one over WebRTC (the
    server needs ``rtc_host_addresses=["127.0.0.1"]``). Returns how many ended which way."""
    def one(k: int) -> Any:
        if rtc_every and k % rtc_every == rtc_every - 1:
            return rtc_session(server)
        return one_session(server, k)

    done: Counter[str] = Counter()
    for base in range(start, start + n, parallel):
        ks = range(base, min(base + parallel, start + n))
        for kind in await asyncio.gather(*(one(k) for k in ks)):
            done[kind] += 1
    return done


#: what only a connection's or a session's tasks wait in
_SESSION_WORK = ("run_asgi", "pacer-", "producer-", "ws-recv-", "ws-send-", "ws-feed-",
                 "SessionManager._close")


async def _busy() -> list[str]:
    """The server's tasks that belong to a connection or a session (a teardown running)."""
    me = asyncio.current_task()
    return [w for w in (_where(t) for t in asyncio.all_tasks() if t is not me)
            if any(k in w for k in _SESSION_WORK)]


async def wait_idle(server: LiveServer, timeout: float = 20.0) -> None:
    """Until the server holds no session and every connection's handler has finished (a
    session leaves the registry first, then its tasks stop, then its handler returns)."""
    sessions = server.services.sessions
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        busy = asyncio.run_coroutine_threadsafe(_busy(), server.loop).result(10)
        if not (sessions.sessions or sessions._reserved or busy):
            return
        assert loop.time() < end, ("the server is not idle", list(sessions.sessions), busy)
        await asyncio.sleep(0.02)


async def settled(server: LiveServer, before: dict[str, Any],
                  timeout: float = 10.0) -> dict[str, Any]:
    """A snapshot once the server holds no more than ``before`` (or when ``timeout`` is up):
    a connection's handler finishes a moment after its session is gone."""
    end = asyncio.get_running_loop().time() + timeout
    while True:
        snap = snapshot(server)
        if (not snap["objects"] - before["objects"] and len(snap["tasks"]) <= len(before["tasks"])
                or asyncio.get_running_loop().time() > end):
            return snap
        await asyncio.sleep(0.05)


def _where(task: asyncio.Task[Any]) -> str:
    """A task's name and its await chain (outermost first), for failure messages."""
    chain, aw = [], task.get_coro()
    while aw is not None and len(chain) < 12:
        code = getattr(aw, "cr_code", None) or getattr(aw, "gi_code", None)
        if code is None:
            chain.append(type(aw).__name__)
            break
        frame = getattr(aw, "cr_frame", None) or getattr(aw, "gi_frame", None)
        chain.append(f"{code.co_qualname}:{frame.f_lineno if frame else '-'}")
        aw = getattr(aw, "cr_await", None) or getattr(aw, "gi_yieldfrom", None)
    return f"{task.get_name()} @ {' > '.join(chain)}"


async def _server_tasks() -> list[str]:
    me = asyncio.current_task()
    return sorted(_where(t) for t in asyncio.all_tasks() if t is not me)


def server_tasks(server: LiveServer) -> list[str]:
    """The server loop's live tasks as 'name @ innermost frames'."""
    return asyncio.run_coroutine_threadsafe(_server_tasks(), server.loop).result(10)


def task_names(snap: dict[str, Any]) -> list[str]:
    return sorted(t.split(" @ ")[0] for t in snap["tasks"])


def live_objects() -> Counter[str]:
    """Live instances of :data:`TRACKED` classes, unreachable cycles included (gc not run)."""
    counts: Counter[str] = Counter()
    for o in gc.get_objects():
        if type(o) in TRACKED:
            counts[type(o).__name__] += 1
    return counts


def snapshot(server: LiveServer) -> dict[str, Any]:
    return {"tasks": server_tasks(server), "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd")), "objects": live_objects(),
            "sessions": len(server.services.sessions.sessions)}
