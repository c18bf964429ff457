"""MuseTalkProcessor: a pipecat service that turns TTS audio into the avatar's video.

Place it right after the TTS service, before the output transport. It consumes
``TTSAudioRawFrame`` (any rate, channels and chunk size) and pushes, for every 40 ms of
speech, one ``OutputImageRawFrame`` marked ``sync_with_audio`` followed by the 40 ms of
original audio it shows, so the output transport switches the picture exactly when that
audio starts to play. When nobody speaks it pushes the avatar's idle loop at 25 fps.
``InterruptionFrame`` drops everything buffered; the next image is idle again.

Two tasks, as in the service's session (``websocket_service/session.py``):

* the *producer* awaits ``stream.render_next()`` and pushes images with their audio; it
  stays at most ``max_lead_s`` ahead of the estimated playout, so the transport's queues
  (unbounded in pipecat) hold about a second of pictures, not a whole reply;
* the *pacer* ticks at 25 fps on absolute deadlines of a replaceable monotonic clock; it
  ends an utterance the TTS left open (no TTSStoppedFrame) after ``speech_gap_ms`` and
  pushes an idle frame on every tick when no speech is playing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from ..avatars.model import Avatar, BaseFrame
from ..avatars.store import AvatarStore
from ..clock import Clock
from ..config import Settings
from ..cursor import Cursor
from ..engines import create_engine
from ..engines.base import SAMPLE_RATE, LipSyncEngine, LipSyncStream, SpeechFrame
from .speech import FPS, Utterance

log = logging.getLogger(__name__)

FRAME_S = 1.0 / FPS
DRAIN_TIMEOUT_S = 30.0  # EndFrame: the longest we wait for buffered speech to be shown


def image_frame(image: np.ndarray) -> OutputImageRawFrame:
    """An RGB picture as a pipecat frame that waits for the audio queued before it."""
    h, w = image.shape[:2]
    frame = OutputImageRawFrame(image=np.ascontiguousarray(image).tobytes(), size=(w, h),
                                format="RGB")
    frame.sync_with_audio = True
    return frame


class MuseTalkProcessor(AIService):
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
        kwargs.setdefault("settings", ServiceSettings(model=None))
        super().__init__(**kwargs)
        self.config = config or Settings()
        self.engine = engine
        self.avatar: Avatar | None = avatar if isinstance(avatar, Avatar) else None
        self._avatar_id = avatar if isinstance(avatar, str) else self.config.default_avatar
        self._base_video = base_video
        self.clock = clock or Clock()
        self.max_lead_s = max_lead_s
        self._stream: LipSyncStream | None = None
        self._cursor: Cursor | None = None
        self._utts: deque[Utterance] = deque()
        self._epoch = 0
        self._speech_until = 0.0  # estimated end of playout of the speech pushed so far
        self._last_audio = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._drained = asyncio.Event()
        #: counters for tests and logs
        self.speech_images = 0
        self.idle_images = 0

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
        cursor = self._cursor_or_new()
        try:
            stream.push_audio(pcm)
            stream.end_segment()
            frames = await stream.render_next(lambda: cursor.next(speech=True), 1)
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

    # ------------------------------------------------------------------ lifecycle
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await asyncio.to_thread(self.initialize_avatars)
        assert self.engine is not None and self.avatar is not None
        self._cursor_or_new()
        self._stream = self.engine.open_stream(self.avatar, self.clock.now)
        self._tasks = [self.create_task(self._produce(), "musetalk-producer"),
                       self.create_task(self._pace(), "musetalk-pacer")]

    async def stop(self, frame: EndFrame) -> None:
        """Graceful end: finish the open utterance and show what is buffered, then stop."""
        await super().stop(frame)
        if self._stream is not None:
            await self._end_utterance()
            if self._utts:
                self._drained.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), DRAIN_TIMEOUT_S)
        await self._shutdown()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._shutdown()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            await self.cancel_task(task)
        self._tasks = []
        if self._stream is not None:
            self._stream.interrupt()
            self._stream.close()
            self._stream = None
        self._utts.clear()

    # ------------------------------------------------------------------ frames in
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if self._stream is None or direction is not FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame):
            await self._add_audio(frame)
        elif isinstance(frame, TTSStartedFrame):
            await self._end_utterance()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStoppedFrame):
            await self._stop_utterance(frame)
        elif isinstance(frame, InterruptionFrame):
            self.interrupt()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def interrupt(self) -> None:
        """Drop buffered speech; the pacer shows the idle loop from its next tick."""
        self._epoch += 1
        if self._stream is not None:
            self._stream.interrupt()
        self._utts.clear()
        self._speech_until = 0.0
        self._drained.set()

    def _open(self) -> Utterance | None:
        return self._utts[-1] if self._utts and not self._utts[-1].ended else None

    async def _add_audio(self, frame: TTSAudioRawFrame) -> None:
        utt = self._open()
        if utt is not None and (utt.rate, utt.channels) != (frame.sample_rate, frame.num_channels):
            await self._end_utterance()
            utt = None
        if utt is None:
            utt = Utterance(frame.sample_rate, frame.num_channels, frame.context_id)
            self._utts.append(utt)
        self._to_engine(utt, await utt.add(frame.audio))
        self._last_audio = self.clock.now()

    def _to_engine(self, utt: Utterance, pcm: np.ndarray) -> None:
        if len(pcm) and self._stream is not None:
            self._stream.push_audio(pcm)
            utt.engine_samples += len(pcm)

    async def _end_utterance(self) -> None:
        utt = self._open()
        if utt is None:
            return
        self._to_engine(utt, await utt.finish())
        if utt.engine_samples == 0:  # no audio at all: nothing will show it
            self._utts.remove(utt)
            await self._pass_stop(utt)
        elif self._stream is not None:
            self._stream.end_segment()

    async def _stop_utterance(self, frame: TTSStoppedFrame) -> None:
        utt = self._utts[-1] if self._utts else None
        if utt is None or utt.stopped is not None:
            await self.push_frame(frame)
            return
        utt.stopped = frame
        await self._end_utterance()

    async def _pass_stop(self, utt: Utterance) -> None:
        if utt.stopped is not None:
            await self.push_frame(utt.stopped)
        if not self._utts:
            self._drained.set()

    # ------------------------------------------------------------------ producer
    async def _produce(self) -> None:
        while True:
            await self._wait_for_playout()
            assert self._stream is not None and self._cursor is not None
            epoch = self._epoch
            try:
                frames = await self._stream.render_next(self._speech_base, FPS // 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad render costs one reply
                log.exception("rendering failed; speech dropped")
                self.interrupt()
                await self.push_error(error_msg=f"avatar rendering failed: {exc}", exception=exc)
                continue
            for f in frames:
                if epoch != self._epoch:
                    break
                await self._show(f)

    def _speech_base(self) -> BaseFrame:
        assert self._cursor is not None
        return self._cursor.next(speech=True)

    async def _wait_for_playout(self) -> None:
        """Stay at most ``max_lead_s`` ahead of what the transport is playing."""
        while self._speech_until - self.clock.now() > self.max_lead_s:
            await self.clock.sleep_until(min(self._speech_until - self.max_lead_s,
                                             self.clock.now() + FRAME_S))

    async def _show(self, f: SpeechFrame) -> None:
        utt = self._utterance_of(f)
        if utt is None:
            return
        await self.push_frame(image_frame(f.image))
        await self.push_frame(TTSAudioRawFrame(utt.audio_for(f.index), utt.rate, utt.channels,
                                               context_id=utt.context_id))
        self.speech_images += 1
        self._speech_until = max(self.clock.now(), self._speech_until) + FRAME_S
        if f.last:
            self._utts.remove(utt)
            await self._pass_stop(utt)

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
        t0 = self.clock.now()
        n = 0
        while True:
            await self.clock.sleep_until(t0 + n * FRAME_S)
            now = self.clock.now()
            late = int((now - t0) / FRAME_S) - n
            n += late if late > 3 else 0  # far behind: resynchronise instead of bursting
            await self._tick(now)
            n += 1

    async def _tick(self, now: float) -> None:
        gap = self.config.speech_gap_ms / 1000
        if self._open() is not None and now - self._last_audio > gap and self._stream is not None \
                and self._stream.ready_frames() == 0:
            await self._end_utterance()  # the TTS went quiet without a TTSStoppedFrame
        if self._utts or now < self._speech_until or self._cursor is None:
            return
        base = self._cursor.next()
        await self.push_frame(image_frame(base.image))
        self.idle_images += 1


__all__ = ["MuseTalkProcessor", "SAMPLE_RATE", "image_frame"]
