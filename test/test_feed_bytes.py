"""Encoded media is bytes from the encoder to the edge: only a WebSocket reader makes base64
JSON, once per packet, shared by every WebSocket reader (the real feed, encoder and recorder;
frames handed to the feed as the session's pacer would)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import numpy as np
import pytest

from websocket_service import frame_text
from websocket_service.config import Settings
from websocket_service.feed import Item, Outbox, SessionFeed
from websocket_service.media.loops import LoopCache, LoopKey
from websocket_service.media.recorder import Recorder, RecordingInfo
from websocket_service.playout import OutputFrame
from websocket_service.session import Session, VideoSettings
from websocket_service.states import AvatarState
from websocket_service.units import SAMPLES_PER_FRAME
from websocket_service.wire import b64, frame_message

from .geometric_support import builtin, engine
from .support import until

SIZE = 128
FRAMES = 12


@pytest.fixture
def b64_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every base64 encoding of a packet (their sizes): frame_text makes them all."""
    calls: list[int] = []

    def counting(packet: bytes) -> str:
        calls.append(len(packet))
        return b64(packet)

    monkeypatch.setattr(frame_text, "b64", counting)
    return calls


def session(session_id: str) -> Session:
    """A session whose pacer does not run: each test hands its feed the frames (and closes it)."""
    video = VideoSettings(width=SIZE, height=SIZE, bitrate=300_000, gop_frames=25, fps=25)
    return Session(session_id, "u1", builtin(), engine(), Settings(), video, "idle")


def frame(n: int, loop_pos: int | None = None) -> OutputFrame:
    img = np.full((SIZE, SIZE, 3), (n * 20) % 256, np.uint8)
    return OutputFrame(n, n * 40, AvatarState.IDLE, img, np.zeros(SAMPLES_PER_FRAME, np.int16),
                       "idle", loop_pos=loop_pos)


class Socket:
    """A WebSocket as the outbox sees it: it keeps what it is sent."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def send_text(self, data: str) -> None:
        self.texts.append(data)


async def open_feed(session: Session, loops: LoopCache | None = None) -> SessionFeed:
    feed = SessionFeed(session, 64, loops, {})
    await feed.open(None)  # the in-process encoder
    return feed


async def test_webrtc_and_recorder_readers_take_bytes_and_nothing_is_base64_encoded(
        b64_calls, tmp_path: Path):
    s = session("rtc-only")
    feed = await open_feed(s)
    rtc = Outbox(s, 64)  # as a WebRTC track reads it: next_frame, the packets as they are
    feed.subscribe(rtc)
    info = RecordingInfo("r1", s.session_id, tmp_path / "r1.mp4")
    rec = Recorder(info, SIZE, SIZE, 25, 2**30)
    feed.add_recorder(rec)
    try:
        for n in range(FRAMES):
            feed.on_frame(frame(n))
        items = [await rtc.next_frame() for _ in range(FRAMES)]
    finally:
        await feed.close()
        await s.close()
    await asyncio.to_thread(rec.join)
    assert all(isinstance(i.data, bytes) and i.data for i in items)
    assert items[0].keyframe and [i.frame.index for i in items if i.frame] == list(range(FRAMES))
    dec = av.CodecContext.create("h264", "r")
    assert sum(len(dec.decode(av.Packet(i.data))) for i in items) == FRAMES
    assert info.status == "done" and info.frames == FRAMES
    assert b64_calls == []  # no reader needed text: no base64 was made
    assert rtc.bytes == sum(len(i.data) for i in items)


async def test_two_websocket_readers_send_one_text_made_once_per_packet(b64_calls):
    s = session("two-ws")
    feed = await open_feed(s)
    socks = [Socket(), Socket()]
    boxes = [Outbox(s, 64) for _ in socks]
    rtc = Outbox(s, 64)
    for box in [*boxes, rtc]:
        feed.subscribe(box)
    tasks = [asyncio.create_task(b.run(s)) for b, s in zip(boxes, socks, strict=True)]
    try:
        for n in range(FRAMES):
            feed.on_frame(frame(n))
        items = [await rtc.next_frame() for _ in range(FRAMES)]
        await until(lambda: all(len(s.texts) == FRAMES for s in socks))
        feed.finish("done")
        await asyncio.gather(*tasks)
    finally:
        await feed.close()
        await s.close()
    frames = [[t for t in s.texts if '"VIDEO_FRAME"' in t] for s in socks]
    assert len(frames[0]) == len(frames[1]) == FRAMES
    assert all(a is b for a, b in zip(*frames, strict=True))  # the same str, not an equal one
    assert b64_calls == [len(i.data) for i in items]  # one base64 per packet, for both readers
    assert all(items[k].text is frames[0][k] for k in range(FRAMES))
    names = builtin().names
    assert all(frames[0][k] == frame_message("two-ws", i.frame, b64(i.data), i.keyframe, names)
               for k, i in enumerate(items) if i.frame is not None)


async def test_a_loop_packet_is_base64_encoded_once_for_every_session(b64_calls):
    avatar = builtin()
    loops = LoopCache()
    first = session("loop-a")
    key = LoopKey.of(avatar.avatar_id, "idle", first.video)
    loop = await loops.ensure(key, avatar.clip("idle").frames)
    assert loop is not None
    pair = [first, session("loop-b")]
    feeds = [await open_feed(s, loops) for s in pair]
    socks = [Socket() for _ in pair]
    boxes = [Outbox(s, 256) for s in pair]  # room for every frame: none is shed
    for feed, box in zip(feeds, boxes, strict=True):
        feed.subscribe(box)
    tasks = [asyncio.create_task(b.run(s)) for b, s in zip(boxes, socks, strict=True)]
    n_frames = loop.period + 10  # round the loop and on: packets come again
    try:
        for n in range(n_frames):
            for feed in feeds:
                feed.on_frame(frame(n, loop_pos=n))
        await until(lambda: all(len(s.texts) == n_frames for s in socks))
        for feed in feeds:
            feed.finish("done")
        await asyncio.gather(*tasks)
    finally:
        for feed, s in zip(feeds, pair, strict=True):
            await feed.close()
            await s.close()
        loops.close()
    assert [s.stats.loop_frames for s in pair] == [n_frames, n_frames]
    assert [s.stats.live_frames for s in pair] == [0, 0]
    assert sorted(b64_calls) == sorted(len(p) for p in loop.packets)  # once per loop packet
    texts = [[t for t in s.texts if '"VIDEO_FRAME"' in t] for s in socks]
    assert texts[0][0] != texts[1][0]  # each session's own id, index and timestamp...
    assert texts[0][0].replace("loop-a", "loop-b") == texts[1][0]  # ...around the same packet
    for n in (0, 1, 26, loop.period + 3):  # byte for byte the text frame_message makes
        p = n % loop.period
        assert texts[0][n] == frame_message("loop-a", frame(n, loop_pos=n), b64(loop.packets[p]),
                                            loop.keyframe[p], avatar.names)


def test_an_event_item_has_its_text_and_a_frame_item_makes_it_once():
    made: list[int] = []

    def make() -> str:
        made.append(1)
        return "text"

    item = Item(frame=frame(0), data=b"\x00\x00\x01", make=make)
    assert item.text is item.text and made == [1]
    assert Item("event").text == "event"
