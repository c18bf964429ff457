"""MuseTalkProcessor: a pipecat service that turns TTS audio into the avatar's video.

Place it right after the TTS service, before the output transport. It consumes
``TTSAudioRawFrame`` (any rate, channels and chunk size) and pushes, for every 40 ms of
speech, one ``OutputImageRawFrame`` marked ``sync_with_audio`` followed by the 40 ms of
original audio it shows (:mod:`.service`). When nobody speaks it pushes the avatar's idle
loop at 25 fps. ``InterruptionFrame`` drops everything buffered; the next image is idle.

Two tasks, as in the service's session:

* the *producer* awaits ``stream.render_next()`` on this process's engine and pushes images
  with their audio; it stays at most ``max_lead_s`` ahead of the estimated playout, so the
  transport's queues (unbounded in pipecat) hold about a second of pictures, not a reply;
* the *pacer* ticks at 25 fps (a :class:`~..pacing.Pacer` on a replaceable clock); it
  ends an utterance the TTS left open and pushes an idle frame when no speech is playing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from pipecat.frames.frames import OutputImageRawFrame, StartFrame

from ..avatars.model import Avatar, BaseFrame
from ..avatars.store import AvatarStore
from ..clock import Clock
from ..config import Settings
from ..cursor import Cursor
from ..engines import create_engine
from ..engines.base import LipSyncEngine, LipSyncStream, SpeechFrame
from ..pacing import Pacer
from ..units import SAMPLES_PER_FRAME
from .service import FRAME_S, AvatarService, image_frame
from .speech import FPS, Utterance

log = logging.getLogger(__name__)



class MuseTalkProcessor(AvatarService):
    """Lip-synced avatar video from TTS audio, with the service's engines and avatars.

    With no arguments it uses the settings from the environment (``ENGINE``, default the
    weight-free engine) and the built-in avatar. Pass a loaded ``engine``, a prepared
    ``avatar`` (or an avatar id) or a service ``config`` (:class:`Settings`) to choose
    otherwise. ``base_video`` picks the avatar's idle loop; ``clock`` replaces the monotonic
    clock (tests); ``max_lead_s`` bounds how far speech runs ahead of its playout.
    """

    def __init__(self, *, engine: LipSyncEngine | None = None, avatar: Avatar | str | None = None,
                 config: Settings | None = None, base_video: str | None = None,
                 clock: Clock | None = None, max_lead_s: float = 1.0, **kwargs: Any) -> None:
        self.config = config or Settings()
        super().__init__(clock=clock, speech_gap_s=self.config.speech_gap_ms / 1000, **kwargs)
        self.engine = engine
        self.avatar: Avatar | None = avatar if isinstance(avatar, Avatar) else None
        self._avatar_id = avatar if isinstance(avatar, str) else self.config.default_avatar
        self._base_video = base_video
        self.max_lead_s = max_lead_s
        self._stream: LipSyncStream | None = None
        self._cursor: Cursor | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ set-up (seed surface)
    def initialize_models(self) -> LipSyncEngine:
        """Build and load the engine named by the settings unless one was given (blocking)."""
        if self.engine is None:
            self.engine = create_engine(self.config)
        return self.engine

    def initialize_avatars(self) -> Avatar:
        """Load (or, for the built-in one, build) the avatar and the engine's cache (blocking)."""
        if self.avatar is None:
            engine = self.initialize_models()
            cfg = self.config
            store = AvatarStore(cfg.avatars_dir, cfg.default_width, cfg.default_height, cfg.fps,
                                engine.prepare_avatar, max_seconds=cfg.max_prepare_seconds)
            if self._avatar_id == cfg.default_avatar:
                self.avatar = store.ensure_builtin(self._avatar_id)
            else:
                self.avatar = store.get(self._avatar_id)
        return self.avatar

    async def generate_video_frame(self, audio_chunk: bytes | np.ndarray) -> OutputImageRawFrame:
        """The image for one chunk of 16 kHz mono int16 speech, rendered on its own.

        A standalone call (its own one-chunk utterance, next base frame of the idle loop);
        a pipeline uses ``process_frame`` with ``TTSAudioRawFrame`` instead.
        """
        engine = await asyncio.to_thread(self.initialize_models)
        avatar = await asyncio.to_thread(self.initialize_avatars)
        pcm = np.frombuffer(audio_chunk, np.int16) if isinstance(audio_chunk, bytes) \
            else np.asarray(audio_chunk, np.int16)
        stream = engine.open_stream(avatar, self.clock.now)
        self._cursor_or_new()
        try:
            stream.push_audio(pcm)
            stream.end_segment()
            frames = await stream.render_next(self._speech_base, 1)
        finally:
            stream.close()
        return image_frame(frames[0].image)

    def _cursor_or_new(self) -> Cursor:
        if self._cursor is None:
            avatar = self.initialize_avatars()
            base = self._base_video or ("idle" if "idle" in avatar.base_videos
                                        else avatar.base_videos[0])
            self._cursor = Cursor(avatar, base, self.config.action_crossfade_frames)
        return self._cursor

    def _speech_base(self) -> BaseFrame:
        return self._cursor_or_new().next(speech=True)

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self._stream is not None

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await asyncio.to_thread(self.initialize_avatars)
        assert self.engine is not None and self.avatar is not None
        self._cursor_or_new()
        self._stream = self.engine.open_stream(self.avatar, self.clock.now)
        self._tasks = [self.create_task(self._produce(), "musetalk-producer"),
                       self.create_task(self._pace(), "musetalk-pacer")]

    async def _shutdown(self) -> None:
        for task in self._tasks:
            await self.cancel_task(task)
        self._tasks = []
        if self._stream is not None:
            self._stream.interrupt()
            self._stream.close()
            self._stream = None
        self._utts.clear()

    # ------------------------------------------------------------------ the engine stream
    async def _speech_in(self, pcm: np.ndarray) -> None:
        assert self._stream is not None
        self._stream.push_audio(pcm)

    async def _speech_end(self) -> None:
        assert self._stream is not None
        self._stream.end_segment()

    async def _speech_interrupt(self) -> None:
        if self._stream is not None:
            self._stream.interrupt()

    # ------------------------------------------------------------------ producer
    async def _produce(self) -> None:
        while True:
            await self._wait_for_playout()
            assert self._stream is not None
            epoch = self._epoch
            try:
                frames = await self._stream.render_next(self._speech_base, FPS // 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad render costs one reply
                log.exception("rendering failed; speech dropped")
                await self.interrupt()
                await self.push_error(error_msg=f"avatar rendering failed: {exc}", exception=exc)
                continue
            for f in frames:
                utt = self._utterance_of(f)
                if epoch != self._epoch or utt is None:
                    break
                await self._show(utt, f.image, f.index * SAMPLES_PER_FRAME)

    async def _wait_for_playout(self) -> None:
        """Stay at most ``max_lead_s`` ahead of what the transport is playing."""
        while self._speech_until - self.clock.now() > self.max_lead_s:
            await self.clock.sleep_until(min(self._speech_until - self.max_lead_s,
                                             self.clock.now() + FRAME_S))

    def _utterance_of(self, f: SpeechFrame) -> Utterance | None:
        """Engine utterances map to ours in order: a new id belongs to the oldest unmapped one."""
        for utt in self._utts:
            if utt.engine_id == f.utterance_id:
                return utt
        for utt in self._utts:
            if utt.engine_id is None:
                utt.engine_id = f.utterance_id
                return utt
        return None

    # ------------------------------------------------------------------ pacer
    async def _pace(self) -> None:
        pacer = Pacer(self.clock, FPS, self.config.resync_after_frames)
        while True:
            await pacer.next()
            await self._tick(self.clock.now())

    async def _tick(self, now: float) -> None:
        if self._stream is not None and self._stream.ready_frames() == 0:
            await self._end_if_quiet(now)
        if not self.speaking and self._cursor is not None:
            await self._show_idle(self._cursor.next().image)


__all__ = ["MuseTalkProcessor", "image_frame"]
