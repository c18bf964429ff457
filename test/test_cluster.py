"""The service on Ray Serve: Ray in this process, two CPU replicas of the real service.

One Ray start for the module. Sessions speak the enveloped protocol
(``{"type", "session_id", "data"}``), stream real-time speech and decode every H.264 frame.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import httpx
import jwt
import numpy as np
import pytest
import websockets

from websocket_service.cluster import deployments, runner
from websocket_service.cluster.settings import ClusterSettings
from websocket_service.config import Settings
from websocket_service.manager import Services

from .conftest import FIXTURES
from .live_server import free_port
from .rtc_client import ClientPeer, WavTrack
from .rtc_client import read_wav as rtc_wav
from .wsclient import read_wav

MAX_SESSIONS = 2
CHUNK = 1280  # 40 ms of 16 kHz s16le: one frame's audio
# users connect with JWTs of their own; the test's REST calls act as the operator
SECRET = "a-jwt-secret-of-at-least-32-bytes!!"
OPERATOR = {"Authorization": "Bearer operator-token"}


def bearer(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {user_token(user_id)}"}


def user_token(user_id: str) -> str:
    return jwt.encode({"sub": user_id, "exp": int(time.time() + 3600)}, SECRET, algorithm="HS256")


class Cluster:
    def __init__(self, port: int) -> None:
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"

    def get(self, path: str) -> Any:
        r = httpx.get(self.http + path, headers=OPERATOR, timeout=30)
        r.raise_for_status()
        return r.json() if r.headers["content-type"].startswith("application/json") else r.text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port = free_port()
    settings = Settings(avatars_dir=tmp_path_factory.mktemp("cluster-avatars"), port=port,
                        host="127.0.0.1", max_sessions=MAX_SESSIONS, init_timeout_s=5.0,
                        # the test counts every frame: a stall of the shared machine must not
                        # cost frames (drop-oldest for slow readers, overdue speech dropped,
                        # silent frames dropped to catch up)
                        max_speech_lag_frames=10_000, send_queue_frames=250,
                        catch_up_in_pauses=False, jwt_secret=SECRET, auth_token="operator-token",
                        rtc_host_addresses=["127.0.0.1"],
                        recordings_dir=tmp_path_factory.mktemp("cluster-recordings"))
    # half a CPU each: Ray may start a replacement replica while the killed one's CPU is held
    spec = ClusterSettings(replicas=2, replica_cpus=0.5, drain_timeout_s=5.0, ray_address=None)
    with ThreadPoolExecutor(1) as pool:  # the avatar is built once (not per replica) meanwhile
        avatar = pool.submit(lambda: Services(settings).ensure_default_avatar())
        started = runner.start_ray(spec, num_cpus=2)
        avatar.result()
    try:
        runner.deploy(settings, spec)
        yield Cluster(port)
    finally:
        runner.shutdown(started)


def envelope(type_: str, session_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "session_id": session_id, "data": data}


def opened(msg: dict[str, Any]) -> dict[str, Any]:
    return msg


class Peer:
    """A client of the enveloped protocol: records every message, decodes every frame."""

    def __init__(self, ws: Any, user_id: str) -> None:
        self.ws = ws
        self.user_id = user_id
        self.session_id = str(uuid.uuid4())
        self.frames: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.decoder = av.CodecContext.create("h264", "r")
        self.changed = asyncio.Condition()
        self.reader: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.closed = False

    @classmethod
    async def open(cls, base: str, user_id: str, view: tuple[str, str] | None = None,
                   by_header: bool = False) -> Peer:
        """A session of ``user_id``'s; ``view``: (session id, view token) to watch instead,
        the session named in the URL too (a browser's socket can carry no header), or in
        Serve's session header (``by_header``: what another client may send)."""
        query = f"?session_id={view[0]}" if view and not by_header else ""
        headers = {"x-session-id": view[0]} if view and by_header else None
        ws = await websockets.connect(f"{base}/musetalk/v1/ws/{user_id}{query}", max_size=2**24,
                                      additional_headers=headers)
        peer = cls(ws, user_id)
        if view:
            peer.session_id = view[0]
            await peer.send("INIT", user_id=user_id, auth_token=view[1], viewer=True)
        else:
            await peer.send("INIT", user_id=user_id, auth_token=user_token(user_id),
                            video_config={"resolution": "512x512", "fps": 25})
        peer.reader = asyncio.create_task(peer._read())
        return peer

    async def send(self, type_: str, **data: Any) -> None:
        await self.ws.send(json.dumps(envelope(type_, self.session_id, data)))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = opened(json.loads(raw))
                assert msg.get("session_id") in (self.session_id, None), msg
                if msg["type"] == "VIDEO_FRAME":
                    frame = msg["data"]
                    out = self.decoder.decode(av.Packet(base64.b64decode(frame["frame_data"])))
                    assert len(out) == 1, f"frame {frame['frame_index']} did not decode"
                    self.frames.append(frame)
                else:
                    self.events.append(msg)
                async with self.changed:
                    self.changed.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed = True
            async with self.changed:
                self.changed.notify_all()

    async def until(self, pred: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Wait for what has arrived to satisfy ``pred`` (or for the socket to close); return
        ``pred()``."""
        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(lambda: pred() or self.closed),
                                       timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.user_id}: waited {timeout} s; {len(self.frames)} frames, utterances of "
                f"{[len(u) for u in self.utterances()]} frames, events "
                f"{[e['type'] for e in self.events]}") from None
        return pred()

    def event(self, type_: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["type"] == type_), None)

    async def speak(self, pcm: bytes) -> int:
        """Send speech as 40 ms chunks at the pace of a live source; the number of chunks."""
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(pcm), CHUNK)):
            piece = pcm[i:i + CHUNK]
            await self.send("GENERATE", audio_chunk={
                "format": "pcm_s16le", "sample_rate": 16000, "channels": 1,
                "duration_ms": len(piece) / 32, "data": base64.b64encode(piece).decode()})
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.04 - time.monotonic()))
        await self.send("END_OF_SPEECH")
        return -(-len(pcm) // CHUNK)

    def utterances(self) -> list[list[int]]:
        """Each utterance's frame numbers as they arrived."""
        out: dict[str, list[int]] = {}
        for f in self.frames:
            if f.get("utterance_frame") is not None:
                out.setdefault(f["utterance_id"], []).append(f["utterance_frame"])
        return list(out.values())

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader


def assert_on_timeline(frames: list[dict[str, Any]], utterance_ms: float) -> None:
    """Frame n of the 25 fps timeline is stamped n * 40 ms; a speech frame instead carries the
    audio time of its own 40 ms chunk (utterances of ``utterance_ms`` each, one after another)."""
    indices = [f["frame_index"] for f in frames]
    assert indices == sorted(set(indices))
    order: list[str] = []
    for f in frames:
        if f.get("utterance_frame") is None:
            assert f["frame_timestamp"] == 40 * f["frame_index"], f["frame_index"]
            continue
        if f["utterance_id"] not in order:
            order.append(f["utterance_id"])
        start = order.index(f["utterance_id"]) * utterance_ms
        assert f["frame_timestamp"] == round(start + 40 * f["utterance_frame"]), f["frame_index"]


async def open_session(cluster: Cluster, user_id: str) -> tuple[Peer, dict[str, Any]]:
    peer = await Peer.open(cluster.ws, user_id)
    reply = await peer.until(lambda: peer.events[0] if peer.events else None, timeout=30)
    return peer, reply


async def until(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Wait for ``cond()`` to hold (counters that aiortc's tasks or the servers change)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := cond()):  # noqa: ASYNC110 - no event to wait on
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


async def poll(http: httpx.AsyncClient, path: str, pred: Callable[[Any], bool],
               timeout: float = 30.0, headers: dict[str, str] = OPERATOR) -> Any:
    """GET ``path`` (as the operator, unless ``headers``) until its JSON satisfies ``pred``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred(body := (await http.get(path, headers=headers)).json()):
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)
    return body


async def no_sessions_left(cluster: Cluster) -> None:
    """The next test starts from an empty cluster (closing is asynchronous on the replicas)."""
    async with httpx.AsyncClient(base_url=cluster.http, timeout=30) as http:
        await poll(http, "/sessions", lambda b: b["count"] == 0)


def replica(reply: dict[str, Any]) -> str:
    return reply["data"]["replica_id"]


async def test_a_burst_within_capacity_all_streams_and_past_it_each_is_refused_cleanly(
        cluster: Cluster) -> None:
    """Sockets opened all at once: none waits in Serve's queue or gets an HTTP error."""
    capacity = 2 * MAX_SESSIONS
    opened = await asyncio.gather(*(open_session(cluster, f"burst{i}") for i in range(capacity)))
    assert [r["type"] for _, r in opened] == ["INIT_SUCCESS"] * capacity, opened
    per_replica = sorted(sum(replica(r) == rid for _, r in opened)
                         for rid in {replica(r) for _, r in opened})
    assert per_replica == [MAX_SESSIONS, MAX_SESSIONS]  # spread before any of them reached INIT
    # past capacity: the protocol's refusal and close 1013, over WebSocket ...
    late = await asyncio.gather(*(open_session(cluster, f"late{i}") for i in range(2)))
    for peer, reply in late:
        assert reply["type"] == "ERROR" and reply["data"]["code"] == "RATE_LIMIT_EXCEEDED", reply
        await peer.until(lambda peer=peer: peer.close_code is not None)
        assert peer.close_code == 1013
    # ... and over HTTP: a new WebRTC session is refused with a hint when to try again
    rtc = ClientPeer()
    offer = await rtc.offer()
    r = httpx.post(f"{cluster.http}/offer", headers=bearer("late-rtc"), timeout=30,
                   json={"sdp": offer.sdp, "type": "offer", "user_id": "late-rtc"})
    await rtc.close()
    assert r.status_code == 429 and r.json()["code"] == "RATE_LIMIT_EXCEEDED", r.text
    assert r.headers["retry-after"] == "1"
    for peer, _ in opened:  # every admitted session streams
        assert await peer.until(lambda peer=peer: len(peer.frames) >= 5)
        assert peer.close_code is None
        await peer.close()
    await no_sessions_left(cluster)

    # more than capacity at once: as many stream as fit, each of the others is refused
    opened = await asyncio.gather(*(open_session(cluster, f"six{i}") for i in range(6)))
    kinds = sorted(r["type"] for _, r in opened)
    assert kinds == ["ERROR"] * (6 - capacity) + ["INIT_SUCCESS"] * capacity, opened
    for peer, reply in opened:
        if reply["type"] == "ERROR":
            assert reply["data"]["code"] == "RATE_LIMIT_EXCEEDED"
            await peer.until(lambda peer=peer: peer.close_code is not None)
            assert peer.close_code == 1013
        else:
            assert await peer.until(lambda peer=peer: len(peer.frames) >= 5)
        await peer.close()
    await no_sessions_left(cluster)


def same_frames(owner: Peer, viewers: list[Peer]) -> int:
    """How many frame indices every reader got; asserts they carry the same bytes."""
    by_index = [{f["frame_index"]: f["frame_data"] for f in p.frames} for p in (owner, *viewers)]
    common = set.intersection(*(set(d) for d in by_index))
    assert all(len({d[i] for d in by_index}) == 1 for i in common)
    return len(common)


async def test_viewers_recording_and_bridge_reach_the_replica_of_their_session(
        cluster: Cluster) -> None:
    """WebSocket viewers (named in the URL), view grants, recording start/stop/download and
    the media bridge, for a session on each replica."""
    pcm = read_wav(FIXTURES / "short_16k.wav")
    owners = [await open_session(cluster, f"owner{i}") for i in range(2)]
    assert len({replica(r) for _, r in owners}) == 2  # one session on each replica
    async with httpx.AsyncClient(base_url=cluster.http, timeout=30) as http:
        audience: list[list[Peer]] = []
        for i, (owner, reply) in enumerate(owners):
            sid = owner.session_id
            grant = await http.post(f"/sessions/{sid}/view_token", headers=bearer(f"owner{i}"))
            assert grant.status_code == 200, grant.text
            view = (sid, grant.json()["view_token"])
            fans = [await Peer.open(cluster.ws, f"fan{i}{k}", view, by_header=k == 2)
                    for k in range(3)]
            for fan in fans:
                got = await fan.until(lambda fan=fan: fan.events and fan.events[0])
                assert got["type"] == "INIT_SUCCESS" and got["data"]["viewer"] is True, got
                assert replica(got) == replica(reply)
            audience.append(fans)
        sid0 = owners[0][0].session_id
        started = await http.post(f"/sessions/{sid0}/recording", headers=bearer("owner0"))
        assert started.status_code == 201, started.text
        rid = started.json()["recording_id"]

        chunks = await asyncio.gather(*(owner.speak(pcm) for owner, _ in owners))
        for (owner, _), fans, n in zip(owners, audience, chunks, strict=True):
            await owner.until(lambda o=owner, n=n: o.utterances() and len(o.utterances()[0]) >= n)
            for fan in fans:
                await fan.until(lambda f=fan, n=n: f.utterances() and len(f.utterances()[0]) >= n)
            assert same_frames(owner, fans) > n  # encoded once, byte for byte the same

        stopped = await http.delete(f"/sessions/{sid0}/recording", headers=bearer("owner0"))
        assert stopped.status_code == 200 and stopped.json()["status"] == "done", stopped.text
        mp4 = await http.get(f"/recordings/{rid}", headers=bearer("owner0"))
        assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(mp4.content)) as container:
            assert sum(1 for _ in container.decode(video=0)) > chunks[0]
        listed = (await http.get("/recordings", headers=bearer("owner0"))).json()
        assert [r["recording_id"] for r in listed["recordings"]] == [rid]

        # the media bridge of the session on the other replica drives what its owner sees
        owner1 = owners[1][0]
        sid1 = owner1.session_id
        async with websockets.connect(f"{cluster.ws}/musetalk/v1/bridge/{sid1}"
                                      f"?token={user_token(owner1.user_id)}",
                                      max_size=2**24) as bridge:
            await bridge.send(json.dumps(envelope("BRIDGE_CONFIG", sid1, {"format": "rgb24"})))
            ready = json.loads(await bridge.recv())
            assert ready["type"] == "BRIDGE_READY", ready
            picture = np.full((ready["data"]["height"], ready["data"]["width"], 3), 200, np.uint8)
            t0 = time.monotonic()
            for k in range(25):  # a second of pictures at 25 fps, on their deadlines
                await bridge.send(struct.pack("<Bd", 1, 40.0 * k) + picture.tobytes())
                await asyncio.sleep(max(0.0, t0 + 0.04 * (k + 1) - time.monotonic()))
            assert await owner1.until(
                lambda: any(f["base_video"] == "bridge" for f in owner1.frames))
    for peer in [*(o for o, _ in owners), *(f for fans in audience for f in fans)]:
        await peer.close()
    await no_sessions_left(cluster)


async def test_webrtc_sessions_mic_and_realtime_viewers_live_on_a_replica(
        cluster: Cluster) -> None:
    """``POST /offer`` opens a peer on a replica (the microphone socket finds it there);
    a management realtime session's WebRTC viewers (``POST /offer`` and the signaling socket
    with ``?session_id=``) reach its replica, and it stops there."""
    speech = rtc_wav("short_16k.wav")
    caller = ClientPeer(WavTrack(speech, lead_s=0.3))
    watchers = [ClientPeer() for _ in range(3)]
    async with httpx.AsyncClient(base_url=cluster.http, timeout=30) as http:
        offer = await caller.offer()
        r = await http.post("/offer", headers=bearer("caller"),
                            json={"sdp": offer.sdp, "type": "offer", "user_id": "caller"})
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        mic = await websockets.connect(f"{cluster.ws}/musetalk/v1/mic/{sid}"
                                       f"?token={user_token('caller')}", max_size=2**22)
        await caller.accept(r.json()["sdp"])
        samples = 0
        async with asyncio.timeout(30):
            while samples < 16000:  # a second of the caller's microphone
                msg = json.loads(await mic.recv())
                assert msg["type"] == "MIC_AUDIO" and msg["session_id"] == sid, msg
                samples += msg["data"]["samples"]
        listed = (await http.get("/sessions", headers=OPERATOR)).json()
        held = {s["session_id"]: s["replica_id"] for s in listed["sessions"]}
        assert listed["count"] == 1 and held[sid] is not None  # it counts on its replica

        show = await http.post("/api/webrtc/realtime/start", headers=bearer("presenter"),
                               params={"session_id": "show"})
        assert show.status_code == 200, show.text
        grant = await http.post("/sessions/show/view_token", headers=bearer("presenter"))
        token = grant.json()["view_token"]
        for w in watchers[:2]:
            offer = await w.offer()
            r = await http.post("/offer", json={"sdp": offer.sdp, "type": "offer",
                                                "session_id": "show", "auth_token": token})
            assert r.status_code == 200 and r.json()["viewer"] is True, r.text
            await w.accept(r.json()["sdp"])
        async with websockets.connect(f"{cluster.ws}/musetalk/v1/rtc/watcher"
                                      "?session_id=show") as sig:
            offer = await watchers[2].offer()
            await sig.send(json.dumps({"type": "offer", "sdp": offer.sdp, "session_id": "show",
                                       "auth_token": token}))
            answer = await next_json(sig, "answer")
            assert answer["viewer"] is True
            await watchers[2].accept(answer["sdp"])
            await asyncio.gather(*(w.wait_connected(20) for w in watchers))
            await until(lambda: all(w.video_frames > 25 for w in watchers), "a second of video")
            detail = await poll(http, "/sessions/show", lambda d: d["rtc"]["viewers"] == 3)
            assert detail["transport"] == "server" and detail["replica_id"] is not None
            stop = await http.post("/api/webrtc/realtime/stop", headers=bearer("presenter"),
                                   params={"session_id": "show"})
            assert stop.status_code == 200, stop.text
            assert (await next_json(sig, "disconnected"))["session_id"] == "show"
        await caller.close()
        await mic.close()
        for w in watchers:
            await w.close()
    await no_sessions_left(cluster)


async def next_json(ws: Any, want: str, timeout: float = 20.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while (msg := json.loads(await ws.recv()))["type"] != want:
            pass
    return msg


def kill_replica(replica_id: str) -> None:
    import ray  # here: websocket_service.cluster, imported first, keeps Ray on loopback
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].endswith(replica_id) and deployments.SESSION_DEPLOYMENT in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


async def test_the_pipecat_processor_of_a_killed_replica_goes_on_on_a_live_one(
        cluster: Cluster) -> None:
    """Failover: the remote processor's replica dies; it says so, opens a new session (back-off
    from 0.5 s) on the replica that lives, and lip-syncs the next reply there."""
    from pipecat.frames.frames import ErrorFrame, Frame, TTSStartedFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.tests.utils import SleepFrame, run_test

    from websocket_service.pipecat.remote import RemoteMuseTalkProcessor

    from .geometric_support import wav
    from .test_pipecat_processor import split, tts

    bystander, reply = await open_session(cluster, "bystander")
    proc = RemoteMuseTalkProcessor(cluster.ws, user_id="bot", auth_token=user_token("bot"))
    lost_at: list[float] = []

    async def kill_the_bots_replica() -> tuple[str, str]:
        victim = await until(lambda: proc.client.info.get("replica_id"), "the bot's session")
        assert victim != replica(reply)  # placed on the other replica
        async with httpx.AsyncClient(base_url=cluster.http, timeout=30) as http:
            started = await http.post(f"/sessions/{proc.client.session_id}/recording",
                                      headers=bearer("bot"))
        assert started.status_code == 201, started.text
        lost_at.append(time.monotonic())
        kill_replica(victim)
        return str(victim), started.json()["recording_id"]

    class AfterReconnecting(FrameProcessor):
        """Holds the reply until the processor has its new session."""

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSStartedFrame):
                await until(lambda: proc.reconnects, "the processor to reconnect")
                print(f"reconnected {time.monotonic() - lost_at[0]:.2f} s after the kill")
            await self.push_frame(frame, direction)

    killer = asyncio.create_task(kill_the_bots_replica())
    pcm = wav("short_16k.wav")
    down, up = await run_test(Pipeline([AfterReconnecting(), proc]), start_timeout=10,
                              frames_to_send=[SleepFrame(0.3), *tts(pcm), SleepFrame(0.3)])
    victim, rid = await killer
    assert proc.reconnects == 1 and proc.client.info["replica_id"] == replica(reply) != victim
    said = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(said) == 1 and "reconnecting" in said[0], said
    speech, _, _ = split(down)
    assert len(speech) == -(-len(pcm) // 640), "the reply after the failover is lip-synced"
    assert bystander.close_code is None  # the other replica's session never noticed
    await bystander.close()
    async with httpx.AsyncClient(base_url=cluster.http, timeout=30) as http:
        # the recording the dead replica was making is not lost silently
        mine = bearer("bot")
        listed = await poll(http, "/recordings", lambda b: b["recordings"], headers=mine)
        assert [(r["recording_id"], r["status"], r["reason"]) for r in listed["recordings"]] \
            == [(rid, "failed", "replica_lost")]
        r = await http.get(f"/recordings/{rid}", headers=mine)
        assert r.status_code == 404 and r.json()["details"]["status"] == "failed", r.text
        # Serve replaces the killed replica: the next test has both again
        await poll(http, "/health", lambda b: b["replicas"] == {"up": 2, "target": 2}, 120)
        await poll(http, "/sessions", lambda b: b["count"] == 0)


async def test_sessions_spread_full_cluster_refuses_and_a_replica_kill_spares_the_other(
        cluster: Cluster) -> None:
    pcm = read_wav(FIXTURES / "short_16k.wav")
    utterance_ms = len(pcm) / 32  # s16le at 16 kHz: 32 bytes per ms
    peers: list[Peer] = []
    for i in range(2 * MAX_SESSIONS):
        peer, reply = await open_session(cluster, f"user{i}")
        assert reply["type"] == "INIT_SUCCESS", reply
        peers.append(peer)
    replica_of = {p.session_id: p.event("INIT_SUCCESS")["data"]["replica_id"] for p in peers}
    by_replica: dict[str, int] = {}
    for rid in replica_of.values():
        by_replica[rid] = by_replica.get(rid, 0) + 1
    assert sorted(by_replica.values()) == [MAX_SESSIONS, MAX_SESSIONS], by_replica

    # ready: every session replica answers
    health = cluster.get("/health")
    assert health["ready"] is True and health["replicas"] == {"up": 2, "target": 2}, health
    # the REST front gathers from every replica
    listed = cluster.get("/sessions")
    assert listed["count"] == 2 * MAX_SESSIONS
    assert {s["session_id"]: s["replica_id"] for s in listed["sessions"]} == replica_of
    assert sorted(r["count"] for r in listed["replicas"]) == [MAX_SESSIONS, MAX_SESSIONS]
    metrics = cluster.get("/metrics")
    for rid in by_replica:
        assert f'avatar_sessions{{replica="{rid}"}} {MAX_SESSIONS}' in metrics
    # session controls reach the replica that holds the session, for its own user only
    for i, peer in enumerate(peers):
        ack = httpx.post(f"{cluster.http}/sessions/{peer.session_id}/end_of_speech",
                         headers=bearer(f"user{i}"), timeout=30)
        assert ack.status_code == 200 and ack.json()["session_id"] == peer.session_id
        other = bearer(f"user{(i + 1) % len(peers)}")
        for r in (httpx.post(f"{cluster.http}/sessions/{peer.session_id}/interrupt",
                             headers=other, timeout=30),
                  httpx.get(f"{cluster.http}/sessions/{peer.session_id}", headers=other,
                            timeout=30)):
            assert r.status_code == 403 and r.json()["code"] == "AUTH_FAILED", r.text
            assert r.json()["details"] == {"session_id": peer.session_id, "reason": "not_owner"}
        mine = httpx.get(f"{cluster.http}/sessions", headers=bearer(f"user{i}"), timeout=30)
        assert [s["session_id"] for s in mine.json()["sessions"]] == [peer.session_id]
    assert 'session="' not in metrics  # no session ids in the open /metrics while auth is on
    missing = httpx.post(f"{cluster.http}/sessions/nope/interrupt", headers=OPERATOR, timeout=30)
    assert missing.status_code == 404 and missing.json()["code"] == "INVALID_SESSION"
    missing = httpx.post(f"{cluster.http}/sessions/nope/interrupt", headers=bearer("user0"),
                         timeout=30)
    assert missing.status_code == 403 and missing.json()["details"]["reason"] == "not_owner"

    # the cluster is full: a fifth session is refused with the protocol's error, at once
    fifth, reply = await open_session(cluster, "user-fifth")
    assert reply["type"] == "ERROR" and reply["data"]["code"] == "RATE_LIMIT_EXCEEDED", reply
    await fifth.until(lambda: fifth.close_code is not None)
    assert fifth.close_code == 1013

    # every session speaks: one lip-synced frame per 40 ms of audio, on the 25 fps timeline
    chunks = await asyncio.gather(*(p.speak(pcm) for p in peers))
    for peer, n in zip(peers, chunks, strict=True):
        await peer.until(lambda peer=peer, n=n: peer.utterances() and len(peer.utterances()[0]) >= n)
        assert peer.utterances() == [list(range(n))]
        assert_on_timeline(peer.frames, utterance_ms)

    # kill one replica: its sockets drop, the other replica's sessions keep streaming and speaking
    import ray  # here: websocket_service.cluster, imported first, keeps Ray on loopback
    victim = next(iter(by_replica))
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].endswith(victim) and deployments.SESSION_DEPLOYMENT in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    doomed = [p for p in peers if replica_of[p.session_id] == victim]
    spared = [p for p in peers if replica_of[p.session_id] != victim]
    for p in doomed:
        await p.until(lambda p=p: p.close_code is not None)
        assert p.close_code not in (1000, None)
    await asyncio.gather(*(p.speak(pcm) for p in spared))
    for peer in spared:
        n = chunks[0]
        await peer.until(lambda peer=peer, n=n: len(peer.utterances()) == 2
                         and len(peer.utterances()[1]) >= n)
        assert peer.utterances() == [list(range(n))] * 2
        assert peer.close_code is None
        assert_on_timeline(peer.frames, utterance_ms)
    for p in spared:
        await p.close()


async def test_draining_finishes_open_sessions_and_sends_new_ones_away(cluster: Cluster) -> None:
    """Last in the module: it deletes the session application."""
    pcm = read_wav(FIXTURES / "short_16k.wav")
    peer, reply = await open_session(cluster, "staying")
    assert reply["type"] == "INIT_SUCCESS", reply
    drain = asyncio.create_task(asyncio.to_thread(runner.drain_sessions, 0.2))
    while "/musetalk" in cluster.get("/-/routes"):  # the route goes first
        await asyncio.sleep(0.1)
    late = await websockets.connect(f"{cluster.ws}/musetalk/v1/ws/late")
    with pytest.raises(websockets.ConnectionClosed) as refused:
        await late.recv()
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 1013
    # the open session still streams and speaks while its replica waits for it
    n = await peer.speak(pcm)
    await peer.until(lambda: peer.utterances() and len(peer.utterances()[0]) >= n)
    assert peer.utterances() == [list(range(n))] and not drain.done()
    await peer.close()
    await asyncio.wait_for(drain, 60)
    # no session replica is left: /health says so to a load balancer
    r = httpx.get(cluster.http + "/health", timeout=30)
    assert r.status_code == 503 and r.json()["ready"] is False, r.text
    assert r.json()["replicas"] == {"up": 0, "target": 2} and r.json()["status"] == "not_ready"


def test_settings_reach_replicas_as_absolute_paths(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = deployments.replica_settings(Settings(avatars_dir=Path("a"), media_dir=Path("m")))
    assert shipped.avatars_dir == tmp_path / "a" and shipped.media_dir == tmp_path / "m"
