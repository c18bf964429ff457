"""Typed settings, read from the environment (and an optional `.env`).

Every setting is documented in `.env.example`. Reach them through :func:`get_settings`,
which tests override with ``get_settings.cache_clear()`` after changing the environment.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import units

#: MUSETALK_DECODE_CHUNK's values: 0 (no chunks) or a batch-size bucket (engines/musetalk/graphs)
DECODE_CHUNKS = (0, 1, 2, 4, 8, 16, 32)

EngineName = Literal["geometric", "musetalk", "auto"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # --- server
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with session_id
    # proxies whose X-Forwarded-For / X-Forwarded-Proto uvicorn believes (addresses or CIDR
    # networks, e.g. ["127.0.0.1"]); empty: none, every client is its socket's peer address
    trusted_proxies: list[str] = Field(default_factory=list)
    # a connection whose request head is not complete within this is closed (slow loris);
    # a request body that stops arriving for BODY_TIMEOUT_S is answered 408
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    # every HTTP request body but avatar uploads (those: MAX_UPLOAD_MB); over it: 413
    max_body_kb: int = Field(2048, ge=1)

    # --- engine
    engine: EngineName = "geometric"
    model_path: Path = Path("models")
    device: str = "auto"
    use_float16: bool = True
    musetalk_version: Literal["v15", "v10"] = "v15"
    # MuseTalk's inference batches: at most this many frames (padded up to a bucket of 1, 2,
    # 4, 8, 16, 32), launched when full, when the most urgent frame's slack is down to the
    # predicted batch time, or after BATCH_WAIT_MS
    batch_max: int = Field(32, ge=1, le=32)
    batch_wait_ms: float = Field(4.0, ge=0, le=100)
    # MuseTalk only: audio-encoder hop (frames per Whisper pass), left audio context of each
    # pass, Whisper window ("short": positional embedding cut to the window; "full": 30 s),
    # crop margins (v1.5 extra_margin, v1.0 bbox_shift, avatar pixels), inference queue bound
    musetalk_hop_frames: int = Field(2, ge=1, le=25)
    musetalk_audio_context_ms: int = Field(1000, ge=0, le=20000)
    musetalk_whisper_window: Literal["short", "full"] = "short"
    musetalk_extra_margin: int = Field(10, ge=0, le=200)
    musetalk_bbox_shift: int = Field(0, ge=-100, le=100)
    musetalk_queue_frames: int = Field(512, ge=1, le=8192)
    # the face decoder: "sd-vae" (upstream quality) or "taesd" (diffusers AutoencoderTiny from
    # MODEL_PATH/taesd/, ~8x fewer FLOPs, blurs fine detail); avatars are encoded by the SD-VAE
    musetalk_decoder: Literal["sd-vae", "taesd"] = "sd-vae"
    # frames per decoder call: a batch's faces are decoded in chunks of this many, earliest due
    # first, each chunk's faces handed back as soon as it is decoded (1, 2, 4, 8, 16 or 32: a
    # bucket; 0: the whole batch in one call)
    musetalk_decode_chunk: int = 8
    # per batch-size bucket: "cuda-graph" (captured at start-up), "compile" (torch.compile, one
    # static graph per bucket), "eager"; "auto": cuda-graph on CUDA, eager on a CPU
    musetalk_graphs: Literal["auto", "eager", "compile", "cuda-graph"] = "auto"
    # inference in its own process (models, latents and schedule there; faces over shared
    # memory); false: a thread of the server
    musetalk_process: bool = True
    # a speech frame is due this long after its audio arrived (the scheduler's deadline)
    musetalk_deadline_ms: int = Field(120, ge=10, le=5000)
    # sessions admitted at once; 0: what the measured (or stand-in) per-batch costs serve in
    # real time with the GPU at most MUSETALK_GPU_UTILISATION busy
    musetalk_max_streams: int = Field(0, ge=0, le=4096)
    musetalk_gpu_utilisation: float = Field(0.95, gt=0, le=1.0)
    # capacity planning without a GPU: the three networks replaced by an H100's measured
    # per-batch waits, faces = the avatar's own crops ("h100": SD-VAE decoder; "h100-taesd")
    gpu_standin: Literal["", "h100", "h100-taesd"] = ""

    # --- avatars
    avatars_dir: Path = Path("data/avatars")
    # server-side files the management API may name (avatar sources, realtime audio);
    # MEDIA_ROOT is the setting's former name, still read
    media_dir: Path = Field(Path("media"), validation_alias=AliasChoices("media_dir", "media_root"))
    default_avatar: str = "default"
    max_upload_mb: int = Field(200, ge=1)
    max_prepare_seconds: float = Field(10.0, gt=0, le=120)
    # avatar sources: an image's or a video frame's width x height, read from the file's header
    # before anything is decoded; over it: 400 INVALID_MESSAGE. A video's kept frames are
    # scaled down to 1280x720 pixels' worth as they are decoded, and decoding stops after
    # MAX_VIDEO_FRAMES frames (docs/DEPLOYMENT.md: what this bounds)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    max_video_frames: int = Field(3000, ge=1)

    # --- sessions and streaming
    max_sessions: int = Field(32, ge=1)
    auth_token: str | None = None
    # JWTs in INIT.data.auth_token (and as Bearer tokens): HS256 with the secret, RS256/ES256
    # with the PEM public key; `exp` and `sub` (= user_id) required
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_leeway_s: float = Field(0.0, ge=0, le=300)
    # browsers' Origin header on WebSockets must be one of these (empty: any origin)
    allowed_origins: list[str] = Field(default_factory=list)
    max_sessions_per_user: int = Field(0, ge=0)  # 0: only MAX_SESSIONS applies
    max_sessions_per_ip: int = Field(0, ge=0)
    # receive-only viewers (WebSocket INIT.data.viewer and WebRTC), 0: no limit of that kind
    max_viewers: int = Field(1000, ge=0)
    max_viewers_per_session: int = Field(100, ge=0)
    max_viewers_per_ip: int = Field(100, ge=0)
    # GET /metrics with this Bearer token gains per-session gauges (session ids); without it,
    # /metrics is open and carries no session ids while any auth is configured
    metrics_token: str | None = None
    # client messages per connection: a token bucket refilled at this rate, of this size
    max_messages_per_s: float = Field(100.0, gt=0)
    message_burst: int = Field(1000, ge=1)
    # sockets not yet authenticated (a protocol socket before INIT, a signaling socket before
    # its authenticated offer) per client address at a time; 0: no limit. They have
    # INIT_TIMEOUT_S in all to authenticate.
    max_pending_per_ip: int = Field(32, ge=0)
    # a connection whose replies pile up and that takes nothing from its socket for this long
    # is not reading: closed 1008 "client not reading"
    send_stall_s: float = Field(10.0, gt=0, le=300)
    # the video rate: fixed at units.FPS (25); the setting exists so that a wrong value is
    # refused with a reason instead of silently drifting lips against the audio
    fps: int = units.FPS
    gop_seconds: float = Field(1.0, gt=0, le=1.0)  # the protocol: an I-frame at least every second
    default_width: int = Field(512, ge=64, le=1920)
    default_height: int = Field(512, ge=64, le=1920)
    default_bitrate: int = Field(1_000_000, ge=50_000, le=20_000_000)
    init_timeout_s: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(256 * 1024, ge=4096)
    ws_per_message_deflate: bool = False
    max_chunk_ms: int = Field(2000, ge=40)
    max_buffered_audio_s: float = Field(30.0, gt=0)
    speech_queue_frames: int = Field(25, ge=1)
    send_queue_frames: int = Field(8, ge=1)
    encoder_processes: int = Field(0, ge=0, le=64)
    #: threads that render and encode frames (0: one per core); OpenCV's own
    #: threads per call (0: OpenCV's default, one per core)
    media_threads: int = Field(0, ge=0, le=256)
    opencv_threads: int = Field(1, ge=0, le=256)
    shared_idle_loops: bool = True
    #: encode the default avatar's first idle loop at start-up, before the server is ready (a
    #: burst of sessions on a cold server then copies it from the first frame)
    idle_loops_at_start: bool = True
    idle_loops_max: int = Field(16, ge=1, le=1024)  # encoded loops kept (LRU)
    recordings_dir: Path = Path("data/recordings")
    max_recordings_mb: int = Field(2048, ge=1)
    prebuffer_frames: int = Field(1, ge=1)
    max_speech_lag_frames: int = Field(2, ge=0, le=10_000)
    # a tick inside an utterance whose next speech frame is still rendering waits up to this
    # long for it (the frame goes out late by that much, its timestamp unchanged) before
    # holding the last picture: an underrun, which pushes the rest of the utterance back a
    # frame until a pause; 0: never wait
    speech_grace_ms: int = Field(15, ge=0, le=30)
    #: behind schedule within that bound, drop silent frames until on time (pauses absorb lag)
    catch_up_in_pauses: bool = True
    #: move a session's ticks (by less than a period) so that an utterance starts exactly when
    #: the engine's jitter allowance has passed, and its frames follow the allowance, instead
    #: of waiting for the next tick (0-40 ms); false: ticks stay on their first phase
    align_ticks_to_speech: bool = True
    speech_gap_ms: int = Field(300, ge=40)
    action_crossfade_frames: int = Field(4, ge=0, le=25)
    resync_after_frames: int = Field(3, ge=1)

    # --- WebRTC
    ice_servers: list[dict] = Field(default_factory=list)
    rtc_host_addresses: list[str] = Field(default_factory=list)
    max_rtc_clients: int = Field(16, ge=1)

    @field_validator("auth_token", "jwt_secret", "jwt_public_key", "metrics_token")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("musetalk_decode_chunk")
    @classmethod
    def _a_bucket(cls, v: int) -> int:
        if v not in DECODE_CHUNKS:
            raise ValueError(f"must be one of {', '.join(map(str, DECODE_CHUNKS))}, got {v}")
        return v

    @field_validator("fps")
    @classmethod
    def _fixed_fps(cls, v: int) -> int:
        if v != units.FPS:
            raise ValueError(
                f"FPS must be {units.FPS}: every 40 ms audio chunk of the protocol is one video "
                f"frame's audio ({units.SAMPLES_PER_FRAME} samples at {units.SAMPLE_RATE} Hz), and "
                f"MuseTalk's audio features come two to a frame; other rates are not supported")
        return v

    @field_validator("jwt_public_key")
    @classmethod
    def _pem_newlines(cls, v: str | None) -> str | None:
        return v.replace("\\n", "\n") if v else v  # a PEM in one .env line, "\n"-escaped

    @field_validator("log_level")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return v

    @field_validator("rtc_host_addresses")
    @classmethod
    def _ip_addresses(cls, v: list[str]) -> list[str]:
        for addr in v:
            ipaddress.ip_address(addr)  # ValueError names the bad address
        return v

    @model_validator(mode="after")
    def _even_size(self) -> Settings:
        if self.default_width % 2 or self.default_height % 2:
            raise ValueError("DEFAULT_WIDTH and DEFAULT_HEIGHT must be even (H.264 4:2:0)")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
