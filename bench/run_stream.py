"""Drive the geometric engine through its stream API on a WAV file (shared by bench + tests)."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np

from websocket_service.avatars.model import Avatar, BaseFrame
from websocket_service.engines.base import SpeechFrame


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path} is not 16 kHz mono s16")
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).copy()


def base_cycle(avatar: Avatar, clip: str = "idle"):
    """A take_base callable walking through ``clip`` (ping-pong like an idle loop)."""
    frames = avatar.clips[clip].frames
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    state = {"i": 0}

    def take() -> BaseFrame:
        idx = order[state["i"] % len(order)]
        state["i"] += 1
        return BaseFrame(clip, idx, frames[idx])

    return take


async def _speak(engine, avatar: Avatar, pcm: np.ndarray, take, chunk: int) -> list[SpeechFrame]:
    stream = engine.open_stream(avatar)
    for i in range(0, len(pcm), chunk):
        stream.push_audio(pcm[i:i + chunk])
    stream.end_segment()
    out: list[SpeechFrame] = []
    while True:
        frames = await stream.render_next(take, 8)
        out.extend(frames)
        if not frames or frames[-1].last:
            return out


def speak(engine, avatar: Avatar, pcm: np.ndarray, clip: str = "idle",
          chunk: int = 1600) -> list[SpeechFrame]:
    """All frames of one utterance, rendered through push_audio/end_segment/render_next."""
    return asyncio.run(_speak(engine, avatar, pcm, base_cycle(avatar, clip), chunk))
