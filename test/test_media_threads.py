"""The media threads: sized to the machine, and where rendering and encoding run."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import cv2
import numpy as np
import pytest

from websocket_service.avatars.model import BaseFrame
from websocket_service.engines.geometric.fields import MouthPose
from websocket_service.engines.geometric.stream import GeometricStream
from websocket_service.media import threads
from websocket_service.media.encoder import H264Encoder
from websocket_service.media.encoder_pool import InProcessEncoder

from .wsclient import Client


@pytest.fixture(autouse=True)
def _restore():
    before = cv2.getNumThreads()
    yield
    threads.configure(0, 1)
    cv2.setNumThreads(before)


async def test_pool_size_and_opencv_threads():
    threads.configure(2, 1)
    assert threads.size() == 2
    assert cv2.getNumThreads() == 1
    names = {await threads.run(lambda: threading.current_thread().name) for _ in range(8)}
    assert names and all(n.startswith("media") for n in names)
    assert len(names) <= 2
    threads.configure(0, 1)
    assert threads.size() == (os.cpu_count() or 1)


async def test_speech_renders_on_media_threads():
    seen: list[str] = []

    def render(base: BaseFrame, pose: MouthPose) -> np.ndarray:
        seen.append(threading.current_thread().name)
        return base.image

    stream = GeometricStream(render, lookahead_frames=1, clock=lambda: 0.0)
    stream.push_audio(np.zeros(640 * 4, np.int16))
    base = BaseFrame("idle", 0, np.zeros((16, 16, 3), np.uint8))
    frames = await stream.render_next(lambda: base, 8)
    assert len(frames) >= 2
    assert seen and all(n.startswith("media") for n in seen)


async def test_in_process_encoder_encodes_on_media_threads():
    seen: list[str] = []

    class Recording(H264Encoder):
        def encode(self, rgb):
            seen.append(threading.current_thread().name)
            return super().encode(rgb)

    enc = InProcessEncoder(Recording(64, 64))
    out = await enc.encode(np.full((64, 64, 3), 128, np.uint8))
    await enc.close()
    assert out.keyframe and out.data.startswith(b"\x00\x00\x00\x01")
    assert seen and seen[0].startswith("media")


async def test_outcome_returns_raises_and_leaves_a_cancelled_waiters_call_running():
    """``outcome``: a call's result or exception on the event loop; cancelling the task that
    waits does not cancel the call, which runs to its end in its thread."""
    threads.configure(1, 1)
    assert await threads.outcome(threads.submit(lambda: 6 * 7)) == 42
    with pytest.raises(ZeroDivisionError):
        await threads.outcome(threads.submit(lambda: 1 / 0))
    gate, started = threading.Event(), threading.Event()

    def held() -> str:
        started.set()
        assert gate.wait(10)
        return "ran to its end"

    call = threads.submit(held)
    waiter = asyncio.create_task(threads.outcome(call))
    assert await asyncio.to_thread(started.wait, 10)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert call.running()
    gate.set()
    assert await asyncio.wrap_future(call) == "ran to its end"


def test_work_goes_earliest_due_first_and_a_build_before_all():
    """One thread, held busy; then calls queue with their due times: they run by due time,
    in submission order on ties, and a loop's build before every frame's work."""
    pool = threads.PriorityPool(1, name="test-media")
    gate = threading.Event()
    order: list[str] = []
    try:
        busy = pool.submit(100.0, gate.wait, 10)
        done = [pool.submit(105.0, order.append, "encode due at 105"),
                pool.submit(103.0, order.append, "blend due at 103"),
                pool.submit(105.0, order.append, "second encode due at 105"),
                pool.submit(140.0, order.append, "blend with slack, due at 140"),
                pool.submit(threads.BUILD, order.append, "loop build")]
        gate.set()
        assert busy.result(10) is True
        for f in done:
            f.result(10)
        assert order == ["loop build", "blend due at 103", "encode due at 105",
                         "second encode due at 105", "blend with slack, due at 140"]
        failing = pool.submit(0.0, lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(10)
    finally:
        gate.set()
        pool.shutdown()


def test_a_call_without_a_due_time_is_due_now():
    """``submit`` without ``due`` queues behind work due earlier and ahead of work due later."""
    threads.configure(1, 1)
    gate = threading.Event()
    order: list[str] = []
    now = time.monotonic()
    calls = [threads.submit(gate.wait, 10),
             threads.submit(order.append, "due in a minute", due=now + 60),
             threads.submit(order.append, "due a second ago", due=now - 1),
             threads.submit(order.append, "due now")]
    gate.set()
    assert [c.result(10) for c in calls] == [True, None, None, None]
    assert order == ["due a second ago", "due now", "due in a minute"]


async def test_a_feed_that_fell_behind_encodes_its_backlog_in_one_call(make_server):
    """Block every media thread; the session goes on emitting live frames (no shared loops),
    which wait in its feed. Released, the feed encodes them in one call: every frame still
    arrives, in order, and decodes."""
    # room for 16 waiting frames: the wait below stops at 5 + the pool's size, and a loaded
    # machine can emit one or two more before the threads are released (CI: 1 dropped)
    server = make_server(shared_idle_loops=False, send_queue_frames=16)
    client, _ = await Client.connect(server.ws)  # decodes every frame: one picture each
    await client.recv_frames(5)
    session = server.services.sessions.get(client.session_id)
    pool = threads._get()
    gate = threading.Event()
    try:
        blockers = [pool.submit(threads.BUILD, gate.wait, 30) for _ in range(pool.size)]
        emitted = session.stats.frames_emitted
        # until 5 frames wait (the feed holds up to SEND_QUEUE_FRAMES)
        await client.recv_until_holds(
            lambda: session.stats.frames_emitted >= emitted + 5 + pool.size, 10,
            "frames emitted while the threads are blocked")
    finally:
        gate.set()
        last = session.stats.frames_emitted - 1  # the backlog's last frame
    for b in blockers:
        assert b.result(10) is True
    await client.recv_frame(lambda f: f["frame_index"] >= last)  # the backlog has arrived
    assert session.stats.batched_frames >= 3
    assert session.stats.frames_dropped == 0
    indices = [f["frame_index"] for f in client.frames]
    assert indices == list(range(indices[0], indices[0] + len(indices)))
    await client.close()
