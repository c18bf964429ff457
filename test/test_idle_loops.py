"""Shared pre-encoded idle loops: what they contain, and splicing them with live speech."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np

from websocket_service.cursor import loop_period, pingpong
from websocket_service.frame_text import _DATA_SLOT, _INDEX_SLOT, _TS_SLOT, _template
from websocket_service.media.loops import LIVE_WHILE_BUILDING, LoopKey, encode_loop
from websocket_service.playout import OutputFrame
from websocket_service.states import AvatarState
from websocket_service.wire import frame_message

from .conftest import FIXTURES
from .geometric_support import builtin
from .wsclient import Client, read_wav


def _decode(packets: list[bytes]) -> list[np.ndarray]:
    dec = av.CodecContext.create("h264", "r")
    out = []
    for s in packets:
        pics = dec.decode(av.Packet(s))
        assert len(pics) == 1
        out.append(pics[0].to_ndarray(format="rgb24"))
    return out


def test_a_loop_is_one_pingpong_period_of_closed_gops():
    frames = builtin().clip("idle").frames
    key = LoopKey("default", "idle", 256, 256, 25, 800_000, 25)
    loop = encode_loop(frames, key)
    assert loop.period == loop_period(len(frames)) == 98
    assert [p for p, k in enumerate(loop.keyframe) if k] == [0, 25, 50, 75]
    # enter at any IDR and play round the loop twice: every packet decodes, and shows the
    # clip frame of its position
    for start in (25, 75):
        order = [(start + i) % loop.period for i in range(2 * loop.period)]
        pics = _decode([loop.packets[p] for p in order])
        for p, pic in zip(order, pics, strict=True):
            want = np.asarray(av.VideoFrame.from_ndarray(frames[pingpong(p, len(frames))])
                              .reformat(256, 256).to_ndarray(format="rgb24"), int)
            assert np.abs(pic.astype(int) - want).mean() < 6.0, p


async def test_idle_speech_idle_action_splices_decode_in_order(server):
    client, _ = await Client.connect(server.ws)  # decodes every frame, one picture each
    session = server.services.sessions.get(client.session_id)
    async def until_copied(n: int) -> None:
        """Receive (and decode) frames until ``n`` of them came from the shared loop."""
        await client.recv_until_holds(lambda: session.stats.loop_frames >= n, 20,
                                      f"{n} loop frames")

    await until_copied(30)  # the loop is encoded on first use; then idle frames are copies
    copied_before_speech = session.stats.loop_frames
    await client.stream_audio(read_wav(FIXTURES / "short_16k.wav"))  # idle -> speech
    await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
    assert session.stats.loop_frames - copied_before_speech < 5  # speech is encoded live
    await until_copied(session.stats.loop_frames + 30)  # speech -> idle: back on the loop
    await client.msg("ACTION", action_index=1)  # idle -> action -> idle
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["previous_state"] == "action")
    await until_copied(session.stats.loop_frames + 30)
    # every frame decoded to one picture (checked as received) and the indices are gapless
    idx = [f["frame_index"] for f in client.frames]
    assert idx == list(range(len(idx)))
    assert len(client.images) == len(client.frames)
    # no jump anywhere: neighbouring pictures stay close, across every splice
    steps = [np.abs(a.astype(int) - b.astype(int)).mean()
             for a, b in zip(client.images, client.images[1:], strict=False)]
    assert max(steps) < 12.0, max(steps)
    # keyframes at least once a second throughout
    keys = [f["frame_index"] for f in client.frames if f["keyframe"]]
    assert keys[0] == 0 and max(np.diff(keys)) <= 25
    await client.close()


BURST = 16  # sessions connecting at once (a restart's returning clients, scaled down)


async def _burst(server, n: int, **init_fields) -> list[Client]:
    """``n`` sessions connecting at once; every client but the first only parses its frames."""
    got = await asyncio.gather(*(Client.connect(server.ws, f"burst{i}", **init_fields)
                                 for i in range(n)))
    for i, (client, reply) in enumerate(got):
        assert reply["type"] == "INIT_SUCCESS", reply
        client.decode = i == 0
    return [c for c, _ in got]


async def _until(clients: list[Client], done, timeout: float = 60.0) -> None:
    """Receive on every client until ``done(client)`` holds for all (or fail after timeout)."""
    async def one(c: Client) -> None:
        await c.recv_until_holds(lambda: done(c), timeout, f"{c.session_id}: done")
    await asyncio.gather(*(one(c) for c in clients))


async def test_a_cold_server_has_its_loop_before_any_session_and_a_burst_only_copies(make_server):
    server = make_server(max_sessions=BURST + 2)
    loops = server.services.loops
    assert loops.stats()["loops"] == 1 and loops.stats()["built"] == 1  # built at start-up
    clients = await _burst(server, BURST)
    await _until(clients, lambda c: len(c.frames) >= 50)
    for c in clients:
        st = server.services.sessions.get(c.session_id).stats
        assert st.live_frames == 0 and st.loop_waits == 0, c.session_id  # no encode at all
        assert st.loop_frames >= len(c.frames)
        idx = [f["frame_index"] for f in c.frames]
        assert idx == list(range(len(idx))) and c.frames[0]["keyframe"]
    assert len(clients[0].images) == len(clients[0].frames)  # each decoded to one picture
    assert loops.stats()["built"] == 1
    await asyncio.gather(*(c.close() for c in clients))


async def test_a_burst_on_a_new_setting_builds_its_loop_once_and_few_encode_live(make_server):
    server = make_server(max_sessions=BURST + 2)
    loops = server.services.loops
    clients = await _burst(server, BURST, video_config={"bitrate": 600_000})
    sessions = [server.services.sessions.get(c.session_id) for c in clients]
    await _until(clients, lambda c: server.services.sessions.get(c.session_id)
                 .stats.loop_frames >= 30)
    sent_live = [s.stats.frames_sent - s.stats.loop_frames for s in sessions]
    assert sum(n > 0 for n in sent_live) <= LIVE_WHILE_BUILDING, sent_live  # the others waited
    live = [s.stats.live_frames for s in sessions]
    assert sum(n > 0 for n in live) <= LIVE_WHILE_BUILDING, live
    assert loops.stats()["built"] == 2  # the default's at start-up, this one's once
    for c, s in zip(clients, sessions, strict=True):
        assert s.stats.live_frames or s.stats.loop_waits or s.stats.loop_frames >= len(c.frames)
        assert c.frames[0]["keyframe"]  # a waiting session starts at one of the loop's IDRs
        idx = [f["frame_index"] for f in c.frames]
        assert idx == sorted(set(idx))
    assert len(clients[0].images) == len(clients[0].frames)
    await asyncio.gather(*(c.close() for c in clients))


async def test_a_session_late_by_frames_stays_on_its_loop(make_server):
    server = make_server(resync_after_frames=1)
    client, _ = await Client.connect(server.ws)  # decodes every frame, one picture each
    session = server.services.sessions.get(client.session_id)
    await _until([client], lambda c: len(c.frames) >= 10)
    server.loop.call_soon_threadsafe(time.sleep, 0.3)  # the server stalls: its pacers skip
    await _until([client], lambda c: session.stats.skipped_frames > 0 and len(c.frames) >= 60)
    idx = [f["frame_index"] for f in client.frames]
    assert idx != list(range(len(idx)))  # frames went missing...
    assert session.stats.live_frames == 0  # ...and the loop went on: nothing was encoded
    assert session.stats.loop_frames >= len(client.frames)
    await client.close()


def test_a_copied_frames_message_is_the_text_frame_message_makes():
    """Copied loop frames get their message from a template (no models per frame): the very
    text that frame_message makes, for any packet, timestamp and index."""
    names = builtin().names
    for state in (AvatarState.IDLE, AvatarState.SPEAKING):
        for key in (True, False):
            f = OutputFrame(0, 0, state, np.zeros((2, 2, 3), np.uint8), b"", "idle", loop_pos=0)
            probe = OutputFrame(_INDEX_SLOT, _TS_SLOT, state, f.image, b"", "idle", loop_pos=0)
            texts, slots = _template(frame_message("s1", probe, _DATA_SLOT, key, names))
            for index, ts, data in ((0, 0, "AAAA"), (123456, 4938400, "Zm9v+/8=")):
                values = {"data": data, "timestamp": str(ts), "index": str(index)}
                text = texts[0] + "".join(values[n] + t for n, t in zip(slots, texts[1:],
                                                                          strict=True))
                f.index, f.timestamp_ms = index, ts
                assert text == frame_message("s1", f, data, key, names)
