"""The encoder process pool: real worker processes, real H.264 decoding of what comes back."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from websocket_service.errors import ProcessingError
from websocket_service.media.encoder import H264Encoder
from websocket_service.media.encoder_pool import (
    EncoderPool,
    InProcessEncoder,
    PoolEncoder,
    open_encoder,
)

from .wsclient import Client

W, H = 128, 96


def frames(n: int) -> list[np.ndarray]:
    """A moving gradient, so P-frames carry real motion."""
    y, x = np.mgrid[0:H, 0:W]
    out = []
    for i in range(n):
        r = (x * 2 + i * 3) % 256
        g = (y * 2 + i * 5) % 256
        b = ((x + y) + i * 7) % 256
        out.append(np.dstack([r, g, b]).astype(np.uint8))
    return out


def decode(units: list[bytes]) -> list[np.ndarray]:
    codec = av.CodecContext.create("h264", "r")
    out = []
    for data in units:  # one access unit per packet, as the client feeds them
        out.extend(f.to_ndarray(format="rgb24") for f in codec.decode(av.Packet(data)))
    out.extend(f.to_ndarray(format="rgb24") for f in codec.decode(None))
    return out


def _alive(pid: int | None) -> bool:
    """The process exists and is no zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("psm_")}


@pytest.fixture
async def pool():
    p = EncoderPool(2)
    await p.start()
    yield p
    await p.aclose()


async def test_pool_output_decodes_like_in_process(pool):
    src = frames(30)
    handle = await pool.open(W, H, 25, 500_000, 10)
    ref = H264Encoder(W, H, 25, 500_000, 10)
    got = [await handle.encode(f) for f in src]
    want = [ref.encode(f) for f in src]
    assert [e.pts for e in got] == list(range(30))
    assert [e.keyframe for e in got] == [i % 10 == 0 for i in range(30)]
    for e in got:
        if e.keyframe:  # SPS and PPS repeated on every keyframe
            assert b"\x00\x00\x01\x67" in e.data or b"\x00\x00\x00\x01\x67" in e.data
            assert b"\x00\x00\x01\x68" in e.data
    a, b = decode([e.data for e in got]), decode([e.data for e in want])
    assert len(a) == len(b) == 30
    for x, y in zip(a, b, strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).mean() < 1.0
    await handle.close()


async def test_request_keyframe(pool):
    handle = await pool.open(W, H, 25, 500_000, 50)
    src = frames(6)
    keys = [(await handle.encode(f)).keyframe for f in src[:3]]
    handle.request_keyframe()
    keys += [(await handle.encode(f)).keyframe for f in src[3:]]
    assert keys == [True, False, False, True, False, False]
    await handle.close()


async def test_many_encoders_across_workers(pool):
    handles = [await pool.open(W, H, 25, 300_000, 25) for _ in range(8)]
    assert sorted(s.encoders for s in pool.slots()) == [4, 4]  # least-loaded assignment
    src = frames(5)
    results = await asyncio.gather(*(_seq(h, src) for h in handles))
    for units in results:
        assert len(decode(units)) == 5
    for h in handles:
        await h.close()
    assert [s.encoders for s in pool.slots()] == [0, 0]


async def _seq(handle, src: list[np.ndarray]) -> list[bytes]:
    return [(await handle.encode(f)).data for f in src]


async def test_killed_worker_gives_clear_error_then_recovers(pool):
    handle = await pool.open(W, H, 25, 500_000, 25)
    src = frames(6)
    for f in src[:3]:
        await handle.encode(f)
    slot = handle._slot
    dead = slot.pid
    assert dead is not None and dead != os.getpid()
    os.kill(dead, signal.SIGKILL)
    with pytest.raises(ProcessingError, match="encoder process died"):
        for _ in range(500):  # the death is noticed on a frame in flight, or on a later one
            await handle.encode(src[3])
    assert not slot.running  # the broken executor is dropped
    after = [await handle.encode(f) for f in src[3:]]  # a new one, after the back-off
    assert after[0].keyframe  # a fresh encoder starts with a keyframe
    assert slot.running and slot.pid not in (None, dead)
    assert len(decode([e.data for e in after])) == 3
    await handle.close()


async def test_a_worker_that_keeps_dying_is_restarted_with_a_growing_back_off(pool):
    handle = await pool.open(W, H, 25, 500_000, 25)
    slot, image = handle._slot, frames(1)[0]
    waits = []
    for _ in range(3):
        await handle.encode(image)
        os.kill(slot.pid, signal.SIGKILL)
        with pytest.raises(ProcessingError, match="encoder process died"):
            for _ in range(500):
                await handle.encode(image)
        waits.append(slot._retry_at - time.monotonic())
    assert waits[0] > 0 and waits[1] > waits[0] * 1.5 and waits[2] > waits[1] * 1.5
    assert (await handle.encode(image)).keyframe  # and it still recovers
    await handle.close()


async def test_close_frees_shared_memory(pool):
    before = shm_names()
    handles = [await pool.open(W, H) for _ in range(3)]
    assert len(shm_names() - before) == 3
    await handles[0].encode(frames(1)[0])
    for h in handles:
        await h.close()
    assert shm_names() - before == set()
    with pytest.raises(ProcessingError):
        await handles[0].encode(frames(1)[0])


async def test_aclose_frees_what_is_left_open():
    before = shm_names()
    p = EncoderPool(1)
    handle = await p.open(W, H)
    await handle.encode(frames(1)[0])
    pid = p.slots()[0].pid
    await p.aclose()
    assert shm_names() - before == set()
    assert not p.slots()[0].running and not _alive(pid)


async def test_odd_size_is_refused(pool):
    with pytest.raises(ValueError, match="even"):
        await pool.open(W + 1, H)


async def test_websocket_stream_through_the_pool(make_server):
    server = make_server(encoder_processes=2)
    client, reply = await Client.connect(server.ws)
    assert reply["type"] == "INIT_SUCCESS"
    frames = await client.recv_frames(26, timeout=30)
    assert frames[0]["keyframe"]
    assert [f["frame_index"] for f in frames if f["keyframe"]][:2] == [0, 25]
    assert len(client.images) == len(frames)  # every frame decoded
    conn_encoders = list(server.services.encoders._handles)
    assert len(conn_encoders) == 1 and isinstance(conn_encoders[0], PoolEncoder)
    before = shm_names()
    await client.close()
    for _ in range(50):  # the server frees the encoder once it sees the close
        if not server.services.encoders._handles:
            break
        await asyncio.sleep(0.05)
    assert not server.services.encoders._handles
    assert len(before - shm_names()) == 1


def _codec_contexts() -> int:
    # by type: isinstance on a dead weakref.proxy in the list would raise
    return sum(issubclass(type(o), av.codec.context.CodecContext) for o in gc.get_objects())


async def test_in_process_close_frees_the_x264_context_after_a_running_encode() -> None:
    encoder = await open_encoder(None, 512, 512, 25, 1_000_000, 25)
    assert isinstance(encoder, InProcessEncoder)
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)
    assert (await encoder.encode(image)).keyframe
    gc.disable()  # only reference counting may free it
    try:
        before = _codec_contexts()
        # a caller cancelled mid-encode leaves the encode running in its thread: close waits
        task = asyncio.create_task(encoder.encode(image))
        await asyncio.sleep(0)  # the encode starts in its thread
        task.cancel()
        await encoder.close()
        assert _codec_contexts() == before - 1  # freed now, not at the next collection
    finally:
        gc.enable()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessingError):
        await encoder.encode(np.zeros((512, 512, 3), np.uint8))
    await encoder.close()  # idempotent


@pytest.mark.parametrize("in_pool", [True, False])
async def test_an_i420_picture_encodes_to_the_bytes_of_its_rgb(pool, in_pool):
    """Both encoders take I420 pictures (the MuseTalk engine's speech frames) as they are:
    the same access units as for the RGB they were converted from, RGB and I420 mixed."""
    src = frames(12)
    i420 = [cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420) for f in src]
    a = await pool.open(W, H, 25, 500_000, 10) if in_pool else await open_encoder(
        None, W, H, 25, 500_000, 10)
    b = await pool.open(W, H, 25, 500_000, 10) if in_pool else await open_encoder(
        None, W, H, 25, 500_000, 10)
    mixed = [i420[k] if k % 2 else src[k] for k in range(len(src))]
    got = await a.encode_many(mixed)
    want = await b.encode_many(src)
    assert [e.data for e in got] == [e.data for e in want]
    assert len(decode([e.data for e in got])) == 12
    with pytest.raises(ValueError, match=f"frame is {W}x{H // 2}"):
        await a.encode(np.zeros((H * 3 // 4, W), np.uint8))
    await a.close()
    await b.close()
