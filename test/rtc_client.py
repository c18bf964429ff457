"""An aiortc client peer for the tests: plays a WAV as its microphone, counts what it gets."""

from __future__ import annotations

import asyncio
import contextlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bench import run_stream
from websocket_service.transports.rtc_network import host_addresses

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PIECE = 320  # 20 ms at 16 kHz


def read_wav(name: str) -> np.ndarray:
    return run_stream.read_wav(FIXTURES / name)


class WavTrack(MediaStreamTrack):
    """Plays ``pcm`` once, in real time, after ``lead_s`` of silence; silence afterwards."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray, lead_s: float = 0.5) -> None:
        super().__init__()
        lead = np.zeros(int(lead_s * 16000), np.int16)
        self.pcm = np.concatenate([lead, pcm])
        self.n = 0
        self.t0: float | None = None
        self.speech_started_at: float | None = None  # loop time of the first speech sample
        self._lead = len(lead)

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        if self.t0 is None:
            self.t0 = loop.time()
        await asyncio.sleep(max(0.0, self.t0 + self.n * PIECE / 16000 - loop.time()))
        start = self.n * PIECE
        if start >= self._lead and self.speech_started_at is None:
            self.speech_started_at = loop.time()
        chunk = self.pcm[start:start + PIECE]
        chunk = np.pad(chunk, (0, PIECE - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        frame.pts = start
        frame.time_base = Fraction(1, 16000)
        self.n += 1
        return frame


class ClientPeer:
    """Receives the avatar's video and audio; optionally sends a microphone track."""

    def __init__(self, mic: MediaStreamTrack | None = None,
                 video_codecs: tuple[str, ...] | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        video = self.pc.addTransceiver("video", direction="recvonly")
        if video_codecs is not None:  # e.g. ("video/VP8",): a client that cannot take H.264
            caps = RTCRtpReceiver.getCapabilities("video").codecs
            video.setCodecPreferences([c for c in caps if c.mimeType in video_codecs])
        if mic is not None:
            self.pc.addTrack(mic)
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.video_frames = 0
        self.video_size: tuple[int, int] | None = None
        self.audio_frames = 0
        self.audio_peak = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.video_frames += 1
                self.video_size = (frame.width, frame.height)
            else:
                self.audio_frames += 1
                self.audio_peak = max(self.audio_peak, int(np.abs(frame.to_ndarray()).max()))

    async def offer(self) -> RTCSessionDescription:
        with host_addresses(["127.0.0.1"]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription

    async def accept(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def close(self) -> None:
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
