"""Protocol messages, one Pydantic model each, parsed through a discriminated union.

The wire format is documented in ``musetalk_websocket_spec.md``; keep both in step.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from .states import AvatarState

USER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SAMPLE_RATE = 16_000


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _uuid4(v: str) -> str:
    try:
        u = uuid.UUID(v)
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError("session_id must be a UUID v4 string") from exc
    if u.version != 4:
        raise ValueError("session_id must be a UUID version 4")
    return str(u)


# ------------------------------------------------------------------ client -> server

class VideoConfig(_Msg):
    avatar_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    base_video: str | None = Field(None, max_length=64)
    width: int | None = Field(None, ge=64, le=1920, multiple_of=2)
    height: int | None = Field(None, ge=64, le=1920, multiple_of=2)
    bitrate: int | None = Field(None, ge=50_000, le=20_000_000)
    gop_seconds: float | None = Field(None, gt=0, le=10)


class AudioChunk(_Msg):
    data: str = Field(..., description="base64 of PCM s16le samples")
    format: Literal["pcm_s16le"] = "pcm_s16le"
    sample_rate: Literal[16000] = 16000
    channels: Literal[1] = 1
    duration_ms: float | None = Field(None, ge=0)

    def pcm(self, max_ms: int) -> np.ndarray:
        """Decoded int16 samples; raises ValueError with a readable reason."""
        max_b64 = (max_ms * SAMPLE_RATE // 1000 * 2 + 2) * 4 // 3 + 4
        if len(self.data) > max_b64:
            raise ValueError(f"audio_chunk longer than the maximum of {max_ms} ms")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("audio_chunk.data is not valid base64") from exc
        return pcm_from_bytes(raw, max_ms, self.duration_ms)


def pcm_from_bytes(raw: bytes, max_ms: int, duration_ms: float | None = None) -> np.ndarray:
    if len(raw) % 2:
        raise ValueError(f"PCM s16le needs an even byte count, got {len(raw)} bytes")
    n = len(raw) // 2
    if n == 0:
        raise ValueError("audio chunk is empty")
    if n > max_ms * SAMPLE_RATE // 1000:
        raise ValueError(f"audio chunk of {n} samples exceeds the maximum of {max_ms} ms")
    if duration_ms is not None and abs(duration_ms - n / 16.0) > 1.0:
        raise ValueError(f"duration_ms={duration_ms} does not match {n} samples ({n / 16.0} ms at 16 kHz)")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


class InitMsg(_Msg):
    type: Literal["INIT"]
    session_id: str
    user_id: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    auth_token: str | None = None
    video_config: VideoConfig = Field(default_factory=VideoConfig)

    @field_validator("session_id")
    @classmethod
    def _sid(cls, v: str) -> str:
        return _uuid4(v)


class GenerateMsg(_Msg):
    type: Literal["GENERATE"]
    session_id: str
    audio_chunk: AudioChunk
    video_state: AvatarState | None = None
    end_of_speech: bool = False


class StateChangeMsg(_Msg):
    type: Literal["STATE_CHANGE"]
    session_id: str
    target_state: AvatarState
    base_video: str | None = Field(None, max_length=64)


class ActionMsg(_Msg):
    type: Literal["ACTION"]
    session_id: str
    action_name: str = Field(..., min_length=1, max_length=64)
    audio_chunk: AudioChunk | None = None


class InterruptMsg(_Msg):
    type: Literal["INTERRUPT"]
    session_id: str


class EndOfSpeechMsg(_Msg):
    type: Literal["END_OF_SPEECH"]
    session_id: str


class CloseMsg(_Msg):
    type: Literal["CLOSE"]
    session_id: str
    reason: str | None = Field(None, max_length=256)


class PingMsg(_Msg):
    type: Literal["PING"]
    session_id: str | None = None
    t: float | None = None


ClientMessage = Annotated[
    InitMsg | GenerateMsg | StateChangeMsg | ActionMsg | InterruptMsg | EndOfSpeechMsg
    | CloseMsg | PingMsg,
    Field(discriminator="type"),
]
CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientMessage)
CLIENT_TYPES = ["INIT", "GENERATE", "STATE_CHANGE", "ACTION", "INTERRUPT", "END_OF_SPEECH",
                "CLOSE", "PING"]


# ------------------------------------------------------------------ server -> client

class InitSuccess(_Msg):
    type: Literal["INIT_SUCCESS"] = "INIT_SUCCESS"
    session_id: str
    model_status: dict[str, Any]
    engine: str
    avatar: str
    base_videos: list[str]
    actions: list[str]
    video_config: dict[str, Any]


class VideoFrame(_Msg):
    type: Literal["VIDEO_FRAME"] = "VIDEO_FRAME"
    session_id: str
    frame_index: int
    timestamp_ms: int
    state: AvatarState
    keyframe: bool
    data: str
    utterance_id: int | None = None
    utterance_frame: int | None = None


class ActionFrame(_Msg):
    type: Literal["ACTION_FRAME"] = "ACTION_FRAME"
    session_id: str
    action_name: str
    progress: float
    frame_index: int
    timestamp_ms: int
    keyframe: bool
    data: str
    utterance_id: int | None = None
    utterance_frame: int | None = None


class StateChanged(_Msg):
    type: Literal["STATE_CHANGED"] = "STATE_CHANGED"
    session_id: str
    previous_state: AvatarState
    current_state: AvatarState
    base_video: str
    action_name: str | None = None


class SpeechEnded(_Msg):
    type: Literal["SPEECH_ENDED"] = "SPEECH_ENDED"
    session_id: str
    utterance_id: int
    frames: int
    skipped: int = 0
    interrupted: bool = False


class CloseAck(_Msg):
    type: Literal["CLOSE_ACK"] = "CLOSE_ACK"
    session_id: str
    reason: str


class Pong(_Msg):
    type: Literal["PONG"] = "PONG"
    t: float | None = None
    server_time_ms: int


class ErrorMsg(_Msg):
    type: Literal["ERROR"] = "ERROR"
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = None
