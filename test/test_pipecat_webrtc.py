"""The pipecat bot over SmallWebRTC, end to end: its real app on a loopback port, an aiortc
client that speaks a WAV into its microphone and receives the avatar's video and audio.

The bot runs offline (echo: the avatar repeats what the VAD heard), so the audio that comes
back is the client's own speech, lip-synced.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import uvicorn
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from websocket_service.clock import Clock
from websocket_service.config import Settings
from websocket_service.pipecat.server import (
    VIDEO_CLOCK,
    AvatarBots,
    PacedVideoTrack,
    create_bot_app,
)
from websocket_service.transports.rtc_network import host_addresses

from .rtc_client import WavTrack, read_wav

SIZE = 256


@contextlib.contextmanager
def bot_server(avatars: Path, **settings: Any) -> Iterator[tuple[str, AvatarBots]]:
    config = Settings(avatars_dir=avatars, default_width=SIZE, default_height=SIZE,
                      rtc_host_addresses=["127.0.0.1"], **settings)
    app = create_bot_app(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here: no race for a free port with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # noqa: ASYNC110 - a server thread has no event to wait on
        assert thread.is_alive() and time.monotonic() < deadline, "bot server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app.state.bots
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


class Caller:
    """A pipecat-style client: audio transceiver first (the mic), then video, both ways."""

    def __init__(self, mic: MediaStreamTrack) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(mic)
        self.pc.addTransceiver("video", direction="recvonly")
        self.video: list[tuple[float, int, tuple[int, int]]] = []  # (arrival, pts, size)
        self.audio_peak = 0
        self.audio_frames = 0
        self.heard_speech = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", lambda t: self._tasks.append(asyncio.create_task(self._consume(t))))

    async def _consume(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.video.append((loop.time(), frame.pts, (frame.width, frame.height)))
            else:
                self.audio_frames += 1
                self.audio_peak = max(self.audio_peak, int(np.abs(frame.to_ndarray()).max()))
                if self.audio_peak > 1000:
                    self.heard_speech.set()

    async def call(self, http: httpx.AsyncClient) -> str:
        with host_addresses(["127.0.0.1"]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        session = (await http.post("/start", json={})).json()["sessionId"]
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        r = await http.post(f"/sessions/{session}/api/offer", json=offer)
        assert r.status_code == 200, r.text
        answer = r.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        return answer["pc_id"]

    async def close(self) -> None:
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


def pts_rate(video: list[tuple[float, int, tuple[int, int]]]) -> float:
    """Seconds of video timestamps per second of arrival (least squares): 1.0 is correct."""
    t = np.array([v[0] for v in video])
    pts = np.array([v[1] for v in video], np.float64) / 90000
    return float(np.polyfit(t - t[0], pts - pts[0], 1)[0])


async def test_browser_style_call_gets_steady_video_with_true_timestamps_and_the_echo(
        tmp_path: Path) -> None:
    with bot_server(tmp_path / "avatars") as (url, bots):
        caller = Caller(WavTrack(read_wav("short_16k.wav"), lead_s=1.0))
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            page = await http.get("/", follow_redirects=True)
            assert page.status_code == 200 and "<html" in page.text.lower()
            pc_id = await caller.call(http)
        await asyncio.wait_for(caller.heard_speech.wait(), 30)
        processor = bots.active[pc_id]
        assert processor.speech_images > 0 and processor.idle_images > 0
        start = len(caller.video)
        async with asyncio.timeout(20):  # a window of 60 frames (2 s at 30 fps)
            while len(caller.video) < start + 60:
                await asyncio.sleep(0.05)
        window = caller.video[start:]
        fps = (len(window) - 1) / (window[-1][0] - window[0][0])
        # 30 fps are sent; a loaded CI machine (both peers share its cores) receives fewer
        assert fps >= 15, f"received {fps:.1f} fps"
        assert {v[2] for v in window} == {(SIZE, SIZE)}
        steps = np.diff([v[1] for v in caller.video])
        grid = 3000 * np.round(steps / 3000)  # aiortc rounds each to +-1 tick of the 90 kHz clock
        assert (grid > 0).all() and (np.abs(steps - grid) <= 1).all(), "on the 30 fps grid"
        rate = pts_rate(caller.video[5:])
        assert 0.97 <= rate <= 1.03, f"video timestamps advance {rate:.3f} s per second"
        assert caller.audio_frames > 100
        await caller.close()


class StallingClock(Clock):
    """Sleeping moves time to the deadline, plus a stall the test arms."""

    def __init__(self) -> None:
        self.t = 50.0
        self.stall = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        self.t = max(self.t, deadline) + self.stall
        self.stall = 0.0


class OnePicture(MediaStreamTrack):
    """A video source that sends one picture and then nothing."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    async def recv(self) -> av.VideoFrame:
        if self.sent:
            await asyncio.Future()  # never: the last picture is repeated
        self.sent = True
        return av.VideoFrame(16, 16)


async def test_paced_video_track_stamps_its_schedule_and_skips_ahead_after_a_stall() -> None:
    clock = StallingClock()
    track = PacedVideoTrack(OnePicture(), fps=30, clock=clock)
    pts = [(await track.recv()).pts for _ in range(3)]
    clock.stall = 0.51  # frame 3 comes 15.3 frames late: frames 3-17 are skipped
    pts += [(await track.recv()).pts for _ in range(2)]
    track.stop()
    step = VIDEO_CLOCK // 30
    assert pts == [0, step, 2 * step, 18 * step, 19 * step]
