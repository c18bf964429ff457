"""The bot's pipeline: transport in -> Silero VAD -> speech services -> avatar -> transport out.

With no speech services configured the bot works offline: :class:`EchoSpeech` records what
the user says (segmented by the VAD) and replays it as TTS audio, so the avatar repeats it
with lip-sync. ``BOT_SERVICES=package.module:function`` names a function returning the
processors (e.g. STT, LLM context aggregators, TTS) to use instead; their API keys and
models come from the environment as usual in pipecat. ``AVATAR_SERVER_URL=ws://gpu-host:8000``
(and ``AVATAR_SERVER_TOKEN`` for its ``AUTH_TOKEN``) renders on a remote avatar server;
``AVATAR_SERVER_JITTER_MS`` (120) is its jitter buffer.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.processors.frameworks.rtvi import RTVIObserverParams
from pipecat.transports.base_transport import BaseTransport, TransportParams

from ..config import Settings
from ..units import SAMPLE_RATE
from .processor import MuseTalkProcessor
from .remote import RemoteMuseTalkProcessor
from .service import AvatarService

log = logging.getLogger(__name__)

#: the output transport redraws the current picture at this rate. 30 (not 25): every 40 ms
#: image is drawn at least once, and aiortc's encoder paces at 30 fps.
VIDEO_OUT_FPS = 30
REPLY_CHUNK_S = 0.1


class EchoSpeech(FrameProcessor):
    """Stand-in for STT + LLM + TTS: replays each user utterance as the bot's speech.

    Keeps ``preroll_s`` of audio before the VAD fired (it fires ``start_secs`` late) and at
    most ``max_s`` per utterance; the user starting to speak interrupts the bot.
    """

    def __init__(self, max_s: float = 15.0, preroll_s: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_s = max_s
        self.preroll_s = preroll_s
        self._recent: deque[InputAudioRawFrame] = deque()
        self._recording: list[InputAudioRawFrame] | None = None
        self.replies = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._keep(frame)  # consumed: the user's audio is not played back as such
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._recording = list(self._recent)
            await self.push_frame(frame, direction)
            await self.broadcast_interruption()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            await self.push_frame(frame, direction)
            await self._reply()
        else:
            await self.push_frame(frame, direction)

    def _keep(self, frame: InputAudioRawFrame) -> None:
        if self._recording is not None:
            if _duration(self._recording) < self.max_s:
                self._recording.append(frame)
            return
        self._recent.append(frame)
        while self._recent and _duration(self._recent) > self.preroll_s:
            self._recent.popleft()

    async def _reply(self) -> None:
        frames, self._recording = self._recording or [], None
        self._recent.clear()
        if not frames:
            return
        audio = b"".join(f.audio for f in frames)
        rate, channels = frames[0].sample_rate, frames[0].num_channels
        step = int(rate * REPLY_CHUNK_S) * 2 * channels
        await self.push_frame(TTSStartedFrame())
        for i in range(0, len(audio), step):
            await self.push_frame(TTSAudioRawFrame(audio[i:i + step], rate, channels))
        await self.push_frame(TTSStoppedFrame())
        self.replies += 1


def _duration(frames: Sequence[InputAudioRawFrame]) -> float:
    return sum(f.num_frames / f.sample_rate for f in frames)


def load_services(spec: str | None = None) -> list[FrameProcessor] | None:
    """The processors named by ``BOT_SERVICES`` (``module:function``), or None for echo."""
    spec = spec if spec is not None else os.environ.get("BOT_SERVICES")
    if not spec:
        return None
    module, _, name = spec.partition(":")
    factory: Callable[[], list[FrameProcessor]] = getattr(importlib.import_module(module), name)
    return list(factory())


P = TypeVar("P", bound=TransportParams)


def avatar_service(config: Settings, shared: MuseTalkProcessor | None = None) -> AvatarService:
    """The avatar for one conversation: on ``AVATAR_SERVER_URL`` (remote) or in this process.

    ``shared`` holds the engine and avatar already loaded here (reused, not reloaded).
    """
    url = os.environ.get("AVATAR_SERVER_URL")
    if url:
        jitter_ms = float(os.environ.get("AVATAR_SERVER_JITTER_MS", "120"))
        return RemoteMuseTalkProcessor(url, auth_token=os.environ.get("AVATAR_SERVER_TOKEN"),
                                       resolution=f"{config.default_width}x{config.default_height}",
                                       jitter_s=jitter_ms / 1000)
    if shared is None:
        return MuseTalkProcessor(config=config)
    return MuseTalkProcessor(engine=shared.engine, avatar=shared.avatar, config=config)


def transport_params(cls: type[P], width: int, height: int, **extra: Any) -> P:
    """Audio in and out, and video out that shows each image when its audio plays."""
    return cls(audio_in_enabled=True, audio_in_sample_rate=SAMPLE_RATE, audio_out_enabled=True,
               video_out_enabled=True, video_out_is_live=False, video_out_width=width,
               video_out_height=height, video_out_framerate=VIDEO_OUT_FPS, **extra)


def build_worker(transport: BaseTransport, avatar: AvatarService,
                 services: list[FrameProcessor] | None = None) -> PipelineWorker:
    """One conversation: the pipeline and the worker that runs it."""
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer())
    middle = services if services is not None else [EchoSpeech()]
    pipeline = Pipeline([transport.input(), vad, *middle, avatar, transport.output()])
    # the VAD's own events reach the client too (RTVI): echo has no user-turn aggregator
    return PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE),
                          cancel_on_idle_timeout=False,
                          rtvi_observer_params=RTVIObserverParams(vad_user_speaking_enabled=True))


def check(processor: AvatarService, config: Settings) -> tuple[int, int]:
    """Fail at start-up, not on the first call: the VAD model, engine and avatar load.

    Returns the video size: the avatar's, or the configured one for a remote avatar.
    """
    SileroVADAnalyzer()  # its ONNX model ships in the wheel; this loads it
    if not isinstance(processor, MuseTalkProcessor):
        log.info("checks passed: VAD; the avatar renders on AVATAR_SERVER_URL")
        return config.default_width, config.default_height
    engine = processor.initialize_models()
    avatar = processor.initialize_avatars()
    log.info("checks passed: VAD, engine %s, avatar %s %dx%d", engine.name, avatar.avatar_id,
             avatar.width, avatar.height)
    return avatar.width, avatar.height
