"""The service on Ray Serve: Ray in this process, two CPU replicas of the real service.

One Ray start for the module. Sessions speak the enveloped protocol
(``{"type", "session_id", "data"}``), stream real-time speech and decode every H.264 frame.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import websockets

from websocket_service.cluster import deployments, runner
from websocket_service.cluster.settings import ClusterSettings
from websocket_service.config import Settings
from websocket_service.manager import Services

from .cluster_support import (
    MAX_SESSIONS,
    OPERATOR,
    SECRET,
    Cluster,
    Peer,
    assert_on_timeline,
    bearer,
    envelope,
    no_sessions_left,
    open_session,
    poll,
    replica,
    same_frames,
    user_token,
)
from .conftest import FIXTURES
from .live_server import free_port
from .rtc_client import ClientPeer, WavTrack
from .rtc_client import read_wav as rtc_wav
from .support import until
from .wsclient import next_of_type, read_wav


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


async def test_a_burst_within_capacity_all_streams_and_past_it_each_is_refused_cleanly(
        cluster: Cluster) -> None:
    """Sockets opened all at once: none waits in Serve's queue or gets an HTTP error."""
    capacity = 2 * MAX_SESSIONS
    opened = await asyncio.gather(*(open_session(cluster, f"burst{i}") for i in range(capacity)))
    assert [r["type"] for _, r in opened] == ["INIT_SUCCESS"] * capacity, opened
    per_replica = sorted(sum(replica(r) == rid for _, r in opened)
                         for rid in {replica(r) for _, r in opened})
    assert per_replica == [MAX_SESSIONS, MAX_SESSIONS]  # spread before any of them reached INIT
    # opened in one burst, the sessions of each replica tick on phases at least 5 ms apart
    async with httpx.AsyncClient(base_url=cluster.http, timeout=30) as http:
        listed = await poll(http, "/sessions", lambda b: b["count"] == capacity and all(
            s["tick_phase_ms"] is not None for s in b["sessions"]), headers=OPERATOR)
    phases: dict[str, list[float]] = {}
    for s in listed["sessions"]:
        phases.setdefault(s["replica_id"], []).append(s["tick_phase_ms"])
    assert sorted(len(p) for p in phases.values()) == [MAX_SESSIONS, MAX_SESSIONS], listed
    for a, b in phases.values():
        apart = abs(a - b) % 40
        assert min(apart, 40 - apart) >= 4.9, phases
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
            answer = await next_of_type(sig, "answer", 20)
            assert answer["viewer"] is True
            await watchers[2].accept(answer["sdp"])
            await asyncio.gather(*(w.wait_connected(20) for w in watchers))
            await until(lambda: all(w.video_frames > 25 for w in watchers), 30, "a second of video")
            detail = await poll(http, "/sessions/show", lambda d: d["rtc"]["viewers"] == 3)
            assert detail["transport"] == "server" and detail["replica_id"] is not None
            stop = await http.post("/api/webrtc/realtime/stop", headers=bearer("presenter"),
                                   params={"session_id": "show"})
            assert stop.status_code == 200, stop.text
            assert (await next_of_type(sig, "disconnected", 20))["session_id"] == "show"
        await caller.close()
        await mic.close()
        for w in watchers:
            await w.close()
    await no_sessions_left(cluster)


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
        victim = await until(lambda: proc.client.info.get("replica_id"), 30, "the bot's session")
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
                await until(lambda: proc.reconnects, 30, "the processor to reconnect")
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
        await poll(http, "/health", lambda b: b["replicas"] == {"up": 2, "target": 2}, timeout=120)
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
