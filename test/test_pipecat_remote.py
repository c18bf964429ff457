"""RemoteMuseTalkProcessor against the real avatar server (uvicorn on a loopback port) over
the envelope WebSocket protocol, with the server's H.264 decoded by the processor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import soxr
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from bench.mouth_metrics import evaluate
from websocket_service.pipecat.remote import RemoteMuseTalkProcessor
from websocket_service.pipecat.remote_client import RemoteAvatarClient, RemoteFrame

from .geometric_support import wav
from .test_pipecat_processor import split, tts


async def test_remote_avatar_lip_syncs_24_khz_tts_with_its_own_audio(server) -> None:
    pcm16 = wav("speech_pauses_16k.wav")
    pcm24 = soxr.resample(pcm16, 16000, 24000).astype(np.int16)
    proc = RemoteMuseTalkProcessor(server.ws)
    down, _ = await run_test(proc, frames_to_send=[SleepFrame(0.3), *tts(pcm24, 24000, 2400)],
                             start_timeout=10)
    speech, audio, idle = split(down)
    assert len(speech) == proc.speech_images == -(-len(pcm16) // 640)  # duration x 25
    played = np.frombuffer(b"".join(audio), np.int16)
    assert np.array_equal(played[:len(pcm24)], pcm24), "each picture brings its own 40 ms"
    last_audio = max(i for i, f in enumerate(down) if isinstance(f, TTSAudioRawFrame))
    assert isinstance(down[last_audio + 1], TTSStoppedFrame)
    face = server.get("/avatars/default").json()["face_box"]
    result = evaluate(speech, pcm16, face, [idle[0]] * len(speech))
    assert result["r"] >= 0.6, result
    assert result["silence_ratio"] < 0.2, result


async def test_remote_interruption_goes_back_to_idle(server) -> None:
    pcm = np.tile(wav("short_16k.wav"), 4)
    proc = RemoteMuseTalkProcessor(server.ws)
    frames = [*tts(pcm, chunk=8000)[:-1], SleepFrame(1.0), InterruptionFrame(), SleepFrame(1.0)]
    down, _ = await run_test(proc, frames_to_send=frames, start_timeout=10)
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before, after = split(down[:cut]), split(down[cut:])
    assert 0 < len(before[0]) < -(-len(pcm) // 640), "interrupted part-way"
    assert after[0] == [] and len(after[2]) > 5, "only idle pictures after the interruption"


async def _end_first_session(server) -> str:
    """Wait for the processor's session on the server, then end it there (a server drain)."""
    sessions = server.services.sessions
    async with asyncio.timeout(10):
        while not sessions.sessions:
            await asyncio.sleep(0.02)
    first = next(iter(sessions.sessions))
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(sessions.close(first), server.loop))
    return first


async def test_remote_avatar_reconnects_when_the_server_ends_its_session(server) -> None:
    pcm = wav("short_16k.wav")
    proc = RemoteMuseTalkProcessor(server.ws, reconnect_backoff_s=0.1)
    ender = asyncio.create_task(_end_first_session(server))
    # the reply comes 2.5 s in: the session was ended ~0.2 s in, and a new one opened 0.1 s later
    down, up = await run_test(proc, frames_to_send=[SleepFrame(2.5), *tts(pcm), SleepFrame(0.3)],
                              start_timeout=10)
    first = await ender
    assert proc.reconnects == 1 and proc.client.session_id != first
    lost = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(lost) == 1 and "reconnecting" in lost[0].error and not lost[0].fatal
    speech, audio, idle = split(down)
    assert len(speech) == -(-len(pcm) // 640), "the reply after the reconnection is lip-synced"
    assert np.array_equal(np.frombuffer(b"".join(audio), np.int16)[:len(pcm)], pcm)
    assert len(idle) > 25, "idle pictures before and after the new session"


class StallingClient(RemoteAvatarClient):
    """The network stalls once: after the ``at``-th speech picture nothing comes for
    ``stall_s``, then the backlog at once."""

    def __init__(self, url: str, stall_s: float, at: int) -> None:
        super().__init__(url)
        self.stall_s, self.at, self.speech = stall_s, at, 0

    async def events(self) -> AsyncIterator[RemoteFrame | dict[str, Any]]:
        async for event in super().events():
            if isinstance(event, RemoteFrame) and event.utterance_id is not None:
                self.speech += 1
                if self.speech == self.at:
                    await asyncio.sleep(self.stall_s)
            yield event


class AudioTimes(FrameProcessor):
    """When each 40 ms of speech audio leaves the avatar."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.times.append(time.monotonic())
        await self.push_frame(frame, direction)


def silence_heard(times: list[float], frame_s: float = 0.04) -> float:
    """Seconds a real-time player of that audio (from its first chunk on) runs dry."""
    end, gaps = times[0], 0.0
    for t in times:
        gaps += max(0.0, t - end)
        end = max(end, t) + frame_s
    return gaps


async def _stalled_reply(server, jitter_s: float) -> float:
    """The silence heard in a reply whose frames stall for 0.3 s midway."""
    pcm = np.tile(wav("short_16k.wav"), 2)  # 60 pictures
    proc = RemoteMuseTalkProcessor(server.ws, jitter_s=jitter_s)
    proc.client = StallingClient(server.ws, stall_s=0.3, at=25)
    times = AudioTimes()
    down, _ = await run_test(Pipeline([proc, times]), frames_to_send=[SleepFrame(0.3), *tts(pcm),
                                                                      SleepFrame(0.5)],
                             start_timeout=10)
    speech, audio, _ = split(down)
    assert len(speech) == -(-len(pcm) // 640) == len(times.times)
    assert np.array_equal(np.frombuffer(b"".join(audio), np.int16)[:len(pcm)], pcm)
    return silence_heard(times.times)


async def test_remote_jitter_buffer_absorbs_a_network_stall(server) -> None:
    """0.3 s without frames mid-reply: heard as a gap without the buffer, not with 0.4 s."""
    without = await _stalled_reply(server, jitter_s=0.0)
    buffered = await _stalled_reply(server, jitter_s=0.4)
    print(f"\nsilence heard in a reply with a 0.3 s stall: {without:.3f} s without a jitter "
          f"buffer, {buffered:.3f} s with 0.4 s")
    assert without >= 0.2, without
    assert buffered < 0.1, buffered
