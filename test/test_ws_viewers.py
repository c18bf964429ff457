"""Viewers: receive-only WebSocket connections on one session, encoded once for all."""

from __future__ import annotations

import asyncio
import json
import socket

import websockets

from .conftest import FIXTURES
from .wsclient import Client, envelope, non_reading_socket, read_wav


def stalled_viewer(port: int, session_id: str) -> socket.socket:
    """A viewer that sends INIT and never reads again (its socket buffers fill up)."""
    return non_reading_socket(port, "/musetalk/v1/ws/stalled",
                              envelope("INIT", session_id, user_id="stalled", viewer=True))


async def test_viewers_get_the_same_packets_and_cannot_control(server):
    owner, _ = await Client.connect(server.ws, "owner")
    await owner.recv_frames(8)
    views = [await Client.watch(server.ws, f"v{i}", owner.session_id) for i in range(3)]
    for _, reply in views:
        assert reply["type"] == "INIT_SUCCESS" and reply["viewer"] is True
        assert reply["session_id"] == owner.session_id
    stalled = stalled_viewer(server.settings.port, owner.session_id)

    async def watch(c: Client) -> None:
        await c.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=20)

    pcm = read_wav(FIXTURES / "short_16k.wav")
    await asyncio.gather(owner.stream_audio(pcm), *(watch(v) for v, _ in views))
    await owner.recv_until(lambda m: m["type"] == "SPEECH_ENDED")

    # encode once: the same frame index carries byte-identical data for every reader
    by_index = [{f["frame_index"]: f["frame_data"] for f in c.frames} for c in
                [owner, *(v for v, _ in views)]]
    common = set.intersection(*(set(d) for d in by_index))
    assert len(common) > 30
    assert all(len({d[i] for d in by_index}) == 1 for i in common)
    for v, _ in views:  # each viewer decodes from its first frame (a keyframe), gapless
        assert v.frames[0]["keyframe"] and len(v.images) == len(v.frames)
        idx = [f["frame_index"] for f in v.frames]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
        assert len(v.speaking()) == 30
    info = server.get(f"/sessions/{owner.session_id}").json()
    assert info["viewers"] == 4  # three readers and the stalled one
    readers = info["readers"]  # owner first, then viewers in the order they came
    assert len(readers) == 5 and all(r["sent"] > 30 and r["kbit_s"] > 0 for r in readers[:4])
    assert server.get("/sessions").json()["count"] == 1  # viewers are not sessions

    # receive-only: control from a viewer is refused, and everyone keeps streaming
    v0 = views[0][0]
    await v0.msg("ACTION", action_index=1)
    err = await v0.error()
    assert err["code"] == "INVALID_SESSION" and "receive-only" in err["message"]
    n = len(v0.frames)
    await v0.recv_frames(8)  # the stream after the refusal
    assert len(v0.frames) > n and all(f["state"] != "action" for f in v0.frames[n:])

    # the owner leaves: the session ends, and viewers are told and closed
    await owner.close()
    for v, _ in views:
        ack = await v.recv_until(lambda m: m["type"] == "CLOSE_ACK", timeout=10)
        assert ack["reason"] == "session_closed"
        await asyncio.wait_for(v.ws.wait_closed(), 5)
        assert v.ws.close_code == 1000
    stalled.close()


async def test_a_stalled_viewer_sheds_frames_and_slows_nobody(server):
    # big all-keyframe frames (~100 KB each), so the stalled socket's buffers fill in seconds
    owner, _ = await Client.connect(server.ws, "owner", video_config={
        "resolution": "1024x1024", "gop_seconds": 0.04, "bitrate": 20_000_000})
    owner.decode = False
    await owner.recv_frames(5)
    stalled = stalled_viewer(server.settings.port, owner.session_id)
    watcher, _ = await Client.watch(server.ws, "watcher", owner.session_id)
    watcher.decode = False  # (test_viewers_get_the_same_packets... decodes every frame)
    feed = server.services.feeds[owner.session_id]
    def shed() -> bool:  # read on until the stalled viewer has shed frames
        return max(b.dropped for b in feed.outboxes) > 0 and len(watcher.frames) >= 60

    await asyncio.gather(watcher.recv_until_holds(shed, 30, "the stalled viewer to shed"),
                         owner.recv_until_holds(shed, 30, "the stalled viewer to shed"))
    dropped = [b.dropped for b in feed.outboxes]
    assert sum(d > 0 for d in dropped) == 1, dropped  # only the stalled one sheds
    idx = [f["frame_index"] for f in watcher.frames]
    assert idx == list(range(idx[0], idx[0] + len(idx))) and len(idx) >= 60
    stalled.close()
    await owner.close()
    await watcher.close()


async def test_viewer_errors(server):
    # no such session, or none named
    c, reply = await Client.watch(server.ws, "v", "no-such-session")
    assert reply["type"] == "ERROR" and reply["code"] == "INVALID_SESSION"
    async with websockets.connect(f"{server.ws}/musetalk/v1/ws/v") as ws:
        await ws.send(json.dumps(envelope("INIT", None, user_id="v", viewer=True)))
        err = json.loads(await ws.recv())
        assert err["type"] == "ERROR" and err["data"]["code"] == "INVALID_MESSAGE"
    await c.close()
