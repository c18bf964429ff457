"""The MuseTalk WebSocket protocol: one envelope, one Pydantic model per message.

Every message, both directions, is ``{"type": T, "session_id": S, "data": {...}}`` as in the
public MuseTalk WebSocket spec (v1.0 and v1.1); our additions live inside ``data``. Client
messages are parsed through one discriminated union (:data:`CLIENT_ADAPTER`); server messages
are built by :mod:`.wire`. The session sockets beside it speak the same envelopes: the media
bridge (``BRIDGE_*``) and the microphone out (``MIC_AUDIO``); their models are here too. The
signaling socket's flat messages are in :mod:`.protocol_rtc`. The wire format is documented
in ``musetalk_websocket_spec.md``; keep both in step.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator
from pydantic_core import PydanticCustomError

from .states import AvatarState
from .units import BYTES_PER_SAMPLE, ID_PATTERN, SAMPLE_RATE

#: a client's timestamps and durations may differ from the bytes by this much before we count it
DURATION_TOLERANCE_MS = 1.0


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ------------------------------------------------------------------ client -> server: data

class VideoConfig(_Msg):
    """``INIT.data.video_config``: upstream fields, then our optional extras."""

    resolution: str | None = Field(None, pattern=r"^[0-9]{2,4}x[0-9]{2,4}$",
                                   description='"WxH", e.g. "512x512"; even, 64..1920')
    fps: int | None = Field(None, ge=1, le=60)
    avatar_id: str | None = Field(None, pattern=ID_PATTERN)
    base_video: str | None = Field(None, max_length=64)
    bitrate: int | None = Field(None, ge=50_000, le=20_000_000)
    gop_seconds: float | None = Field(None, gt=0, le=1.0)

    @model_validator(mode="after")
    def _size(self) -> VideoConfig:
        if self.resolution is not None:
            for v in self.size() or ():
                if not 64 <= v <= 1920 or v % 2:
                    raise ValueError("resolution: width and height must be even, 64..1920")
        return self

    def size(self) -> tuple[int, int] | None:
        if self.resolution is None:
            return None
        w, h = self.resolution.split("x")
        return int(w), int(h)


class AudioChunk(_Msg):
    data: str = Field(..., description="base64 of PCM s16le samples")
    format: Literal["pcm_s16le"] = "pcm_s16le"
    sample_rate: Literal[16000] = 16000
    channels: Literal[1] = 1
    duration_ms: float | None = Field(None, ge=0, le=3_600_000)

    def pcm(self, max_ms: int) -> np.ndarray:
        """Decoded int16 samples; raises ValueError with a readable reason.

        The bytes are the truth: ``duration_ms`` is informational (see :meth:`mislabelled`).
        """
        max_b64 = (max_ms * SAMPLE_RATE // 1000 * BYTES_PER_SAMPLE + 2) * 4 // 3 + 4
        if len(self.data) > max_b64:
            raise ValueError(f"audio_chunk longer than the maximum of {max_ms} ms")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("audio_chunk.data is not valid base64") from exc
        return pcm_from_bytes(raw, max_ms)

    def mislabelled(self, samples: int) -> bool:
        """``duration_ms`` disagrees with the samples (e.g. 640 bytes labelled 40 ms)."""
        return self.duration_ms is not None and \
            abs(self.duration_ms - samples * 1000 / SAMPLE_RATE) > DURATION_TOLERANCE_MS


def pcm_from_bytes(raw: bytes, max_ms: int) -> np.ndarray:
    """int16 samples from PCM s16le bytes: any even, non-zero length up to ``max_ms``."""
    if len(raw) % BYTES_PER_SAMPLE:
        raise ValueError(f"PCM s16le needs an even byte count, got {len(raw)} bytes")
    n = len(raw) // BYTES_PER_SAMPLE
    if n == 0:
        raise ValueError("audio chunk is empty")
    if n > max_ms * SAMPLE_RATE // 1000:
        raise ValueError(f"audio chunk of {n} samples exceeds the maximum of {max_ms} ms")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


class InitData(_Msg):
    user_id: str = Field(..., pattern=ID_PATTERN)
    auth_token: str | None = Field(None, max_length=8192)
    video_config: VideoConfig = Field(default_factory=VideoConfig)
    viewer: bool = False  # ours: watch the existing session ``session_id``, receive-only


class VideoState(_Msg):
    type: AvatarState = AvatarState.SPEAKING
    base_video: str | None = Field(None, max_length=64)


class GenerateData(_Msg):
    audio_chunk: AudioChunk
    video_state: VideoState | None = None
    end_of_speech: bool = False


class StateChangeData(_Msg):
    target_state: AvatarState
    base_video: str | None = Field(None, max_length=64)


class ActionData(_Msg):
    """v1.1 ``{action_index: 1}`` or v1.0 ``{action_type: "action_1", audio_chunk?}``."""

    action_index: int | None = Field(None, ge=1, le=999)
    action_type: str | None = Field(None, min_length=1, max_length=64)
    audio_chunk: AudioChunk | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ActionData:
        if (self.action_index is None) == (self.action_type is None):
            raise ValueError("give exactly one of action_index (v1.1) or action_type (v1.0)")
        return self


class CloseData(_Msg):
    reason: str | None = Field(None, max_length=256)


class PingData(_Msg):
    t: float | None = None


class NoData(_Msg):
    pass


# ------------------------------------------------------------------ client -> server: envelopes

SessionId = Annotated[str | None, Field(None, pattern=ID_PATTERN)]


class InitMsg(_Msg):
    type: Literal["INIT"]
    session_id: SessionId = None  # kept and echoed; None: the server picks one
    data: InitData


class GenerateMsg(_Msg):
    type: Literal["GENERATE"]
    session_id: SessionId = None
    data: GenerateData


class StateChangeMsg(_Msg):
    type: Literal["STATE_CHANGE"]
    session_id: SessionId = None
    data: StateChangeData


class ActionMsg(_Msg):
    type: Literal["ACTION"]
    session_id: SessionId = None
    data: ActionData


class CloseMsg(_Msg):
    type: Literal["CLOSE"]
    session_id: SessionId = None
    data: CloseData = Field(default_factory=CloseData)


class InterruptMsg(_Msg):
    type: Literal["INTERRUPT"]
    session_id: SessionId = None
    data: NoData = Field(default_factory=NoData)


class EndOfSpeechMsg(_Msg):
    type: Literal["END_OF_SPEECH"]
    session_id: SessionId = None
    data: NoData = Field(default_factory=NoData)


class KeyframeRequestMsg(_Msg):
    type: Literal["REQUEST_KEYFRAME"]
    session_id: SessionId = None
    data: NoData = Field(default_factory=NoData)


class PingMsg(_Msg):
    type: Literal["PING"]
    session_id: SessionId = None
    data: PingData = Field(default_factory=PingData)


CLIENT_TYPES = ["INIT", "GENERATE", "STATE_CHANGE", "ACTION", "CLOSE", "INTERRUPT",
                "END_OF_SPEECH", "REQUEST_KEYFRAME", "PING"]
ENVELOPE_KEYS = frozenset({"type", "session_id", "data"})


def flat_fields(raw: dict[str, Any]) -> list[str]:
    """The fields of a flat message (beside ``type`` and without ``data``), sorted; [] if none."""
    return [] if "data" in raw else sorted(k for k in raw if k not in ENVELOPE_KEYS)


def _not_flat(value: Any) -> Any:
    """A flat message is refused, not read with its fields ignored;
    :func:`.wire.check_envelope` says how to wrap it."""
    if isinstance(value, dict) and flat_fields(value):
        raise PydanticCustomError("flat_message", "fields belong inside data")
    return value


ClientMessage = Annotated[
    InitMsg | GenerateMsg | StateChangeMsg | ActionMsg | CloseMsg | InterruptMsg
    | EndOfSpeechMsg | KeyframeRequestMsg | PingMsg,
    Field(discriminator="type"),
]
#: parses a client's text frame in one pass (``validate_json``)
CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Annotated[ClientMessage, BeforeValidator(_not_flat)])


# ------------------------------------------------------------------ server -> client: data

class VideoInfo(_Msg):
    name: str  # the upstream name: idle_0, speaking_0, action_1 ...
    clip: str  # the avatar's own clip name
    kind: Literal["idle", "speaking", "action"]
    frames: int


class InitSuccessData(_Msg):
    model_loaded: bool
    available_videos: list[str]
    default_video: str
    streaming_started: bool = True
    engine: str
    avatar: str
    videos: list[VideoInfo]
    video_config: dict[str, Any]
    model_status: dict[str, Any]
    replica_id: str | None = None
    viewer: bool | None = None


class VideoFrameData(_Msg):
    frame_data: str  # base64 of one H.264 access unit (Annex B)
    frame_timestamp: int  # ms: session clock; for speech, the audio time of its chunk
    frame_index: int
    keyframe: bool
    state: AvatarState
    base_video: str
    utterance_id: int | None = None
    utterance_frame: int | None = None


class ActionFrameData(_Msg):
    frame_data: str
    frame_timestamp: int
    action_progress: float
    action_type: str
    frame_index: int
    keyframe: bool
    state: AvatarState = AvatarState.ACTION
    utterance_id: int | None = None
    utterance_frame: int | None = None


class StateChangedData(_Msg):
    current_state: AvatarState
    current_video: str
    previous_state: AvatarState


class ActionTriggeredData(_Msg):
    action_index: int
    inserted: bool = True
    action_type: str
    frames: int


class SpeechEndedData(_Msg):
    utterance_id: int
    frames: int
    skipped: int = 0
    interrupted: bool = False


class CloseAckData(_Msg):
    reason: str


class PongData(_Msg):
    t: float | None = None
    server_time_ms: int


class ErrorData(_Msg):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------------ the session sockets

class BridgeConfigData(_Msg):
    """``BRIDGE_CONFIG.data`` (client): the frames' format; the size, if given, the session's."""

    format: str = Field("rgb24", max_length=16)
    width: int | None = None
    height: int | None = None


class BridgeMediaData(_Msg):
    """``BRIDGE_FRAME.data`` and ``BRIDGE_AUDIO.data`` (client)."""

    timestamp_ms: float = Field(..., ge=0)
    data: str  # base64: a frame, or 16 kHz mono PCM s16le
    format: str | None = Field(None, max_length=16)  # a frame's, when not the configured one


BRIDGE_TYPES = ["BRIDGE_CONFIG", "BRIDGE_FRAME", "BRIDGE_AUDIO"]


class BridgeReadyData(_Msg):
    """``BRIDGE_READY.data`` (server): the bridge takes frames of this size and format."""

    width: int
    height: int
    format: str


class MicAudioData(_Msg):
    """``MIC_AUDIO.data`` (server): one piece of a WebRTC peer's microphone audio."""

    timestamp_ms: int  # the piece's position in the peer's audio
    sample_rate: int
    samples: int
    dropped: int  # pieces this reader lost so far (it fell behind: the oldest went)
    data: str  # base64 of PCM s16le


class ServerMessage(_Msg):
    """An envelope from the server; ``data`` is one of the ``*Data`` models above."""

    type: Literal["INIT_SUCCESS", "VIDEO_FRAME", "ACTION_FRAME", "STATE_CHANGED",
                  "ACTION_TRIGGERED", "SPEECH_ENDED", "CLOSE_ACK", "PONG", "ERROR",
                  "BRIDGE_READY", "MIC_AUDIO"]
    session_id: str | None = None
    data: BaseModel

    def to_json(self) -> str:
        """The envelope as text; ``session_id`` is always present (null before INIT)."""
        head = json.dumps({"type": self.type, "session_id": self.session_id})
        return f'{head[:-1]}, "data": {self.data.model_dump_json(exclude_none=True)}}}'
