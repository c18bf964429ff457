"""The media threads: sized to the machine, and where rendering and encoding run."""

from __future__ import annotations

import os
import threading

import cv2
import numpy as np
import pytest

from websocket_service.avatars.model import BaseFrame
from websocket_service.engines.geometric.fields import MouthPose
from websocket_service.engines.geometric.stream import GeometricStream
from websocket_service.media import threads
from websocket_service.media.encoder import H264Encoder
from websocket_service.media.encoder_pool import InProcessEncoder


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
    assert threads.size() == (os.cpu_count() or 1) + 1


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
