"""The media bridge: an external renderer's frames come out encoded, decodable and recognisable."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time

import cv2
import numpy as np
import websockets

from .conftest import FIXTURES
from .wsclient import Client, read_wav
from .wsclient import envelope_json as env

SIZE = 256


def pattern(k: int) -> np.ndarray:
    """Frame k: a coloured square that walks across a gradient, easy to tell apart."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]
    img[..., 2] = 60
    x = 8 + 4 * k
    img[96:160, x:x + 48] = (255, 255, 0)
    return img


async def test_pushed_frames_come_out_recognisable_and_errors_have_codes(make_server):
    server = make_server()
    client, _ = await Client.connect(server.ws, video_config={"resolution": f"{SIZE}x{SIZE}"})
    await client.recv_frames(8)
    sid = client.session_id
    url = f"{server.ws}/musetalk/v1/bridge/{sid}"
    async with websockets.connect(url, max_size=2**24) as br:
        await br.send(env("BRIDGE_FRAME", sid, timestamp_ms=0, data=""))  # before the config
        assert json.loads(await br.recv())["data"]["code"] == "INVALID_MESSAGE"
        await br.send(env("BRIDGE_CONFIG", sid, format="rgb24", width=640, height=480))
        err = json.loads(await br.recv())["data"]
        assert err["code"] == "INVALID_MESSAGE" and err["details"]["width"] == SIZE
        await br.send(env("BRIDGE_CONFIG", sid, format="rgb24"))
        ready = json.loads(await br.recv())
        assert ready["type"] == "BRIDGE_READY" and ready["data"]["width"] == SIZE

        speech = read_wav(FIXTURES / "short_16k.wav")[:1280 * 25]  # 1 s of speech
        t0 = time.monotonic()
        for k in range(50):  # 2 s at 25 fps: binary rgb24 first, then JSON JPEG
            ts = 40.0 * k
            if k < 25:
                await br.send(struct.pack("<Bd", 1, ts) + pattern(k).tobytes())
                await br.send(struct.pack("<Bd", 2, ts) + speech[1280 * k:1280 * (k + 1)])
            else:
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(pattern(k), cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, 95])
                await br.send(env("BRIDGE_FRAME", sid, timestamp_ms=ts, format="jpeg",
                                  data=base64.b64encode(jpg.tobytes()).decode()))
            await client.recv_until_time(t0 + 0.04 * (k + 1))  # pushing in real time
        # wrong size and a timestamp that goes back: coded errors, the bridge stays
        await br.send(struct.pack("<Bd", 1, 5000.0) + b"\0" * 100)
        await br.send(struct.pack("<Bd", 1, 10.0) + pattern(0).tobytes())
        codes = [json.loads(await br.recv())["data"] for _ in range(2)]
        assert [c["code"] for c in codes] == ["INVALID_MESSAGE"] * 2
        assert "bytes" in codes[0]["message"] and "goes back" in codes[1]["message"]
        await client.recv_frames(12)  # the last pushed frames shown
    await client.recv_frames(12)  # the bridge closed: back to the avatar's own loop
    await client.close()

    shown = [(f, img) for f, img in zip(client.frames, client.images, strict=True)
             if f["base_video"] == "bridge"]
    assert len(shown) >= 40
    matched = []
    for _, img in shown:
        err = [np.abs(img.astype(int) - pattern(k).astype(int)).mean() for k in range(50)]
        assert min(err) < 8.0, min(err)  # recognisably one of the pushed frames
        matched.append(int(np.argmin(err)))
    # in order; a frame pushed after its time (this test's loop stalled on a busy machine) is
    # skipped for the newest one due, as the bridge should, so not every one need show
    assert matched == sorted(matched) and len(set(matched)) >= 25 and matched[-1] == 49
    assert any(f["state"] == "speaking" for f, _ in shown[:20])  # with the pushed speech
    assert client.frames[-1]["base_video"] == "idle_0"
    assert len(client.images) == len(client.frames)  # everything decoded


async def test_a_bridge_to_an_unknown_session_is_refused(server):
    async with websockets.connect(f"{server.ws}/musetalk/v1/bridge/nope") as br:
        err = json.loads(await br.recv())
        assert err["type"] == "ERROR" and err["data"]["code"] == "INVALID_SESSION"
        await asyncio.wait_for(br.wait_closed(), 5)
        assert br.close_code == 1008
