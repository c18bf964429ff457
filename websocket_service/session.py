"""A streaming session: owns state, timing and the speech pipeline; transports attach as sinks.

Two tasks per session:

* the *producer* turns audio into rendered speech frames through the engine stream and
  puts them on a bounded queue (it waits when the queue is full: backpressure reaches the
  stream's audio buffer, which is itself limited by ``max_buffered_audio_s``);
* the *pacer* emits exactly one frame per period against absolute deadlines on a monotonic
  clock: the next speech frame if one is due, else the idle loop. If it falls more than
  ``resync_after_frames`` behind it skips ahead (counted) instead of bursting.

Every emitted frame goes to every attached sink (WebSocket, WebRTC), which applies its own
bounded drop policy. Control events (state changes, errors) go to sinks too, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from .avatars.model import Avatar, BaseFrame
from .clock import Clock
from .config import Settings
from .cursor import Cursor, resize_to
from .engines.base import SAMPLE_RATE, SAMPLES_PER_FRAME, LipSyncEngine, SpeechFrame
from .errors import ProcessingError, RateLimitExceeded, ServiceError
from .protocol import ErrorMsg, SpeechEnded, StateChanged
from .states import CLIENT_ALLOWED, AvatarState, StateChange, StateMachine
from .stats import SessionStats

log = logging.getLogger(__name__)

SILENCE = np.zeros(SAMPLES_PER_FRAME, np.int16)
AWAIT_SPEECH_S = 2.0


@dataclass
class OutputFrame:
    """One frame of the session's timeline, before any transport encodes it."""

    index: int
    timestamp_ms: int
    state: AvatarState
    image: np.ndarray  # (H, W, 3) uint8 RGB at the session's output size
    pcm: np.ndarray  # the 640 samples of audio that play with this frame (silence if idle)
    action: str | None = None
    progress: float = 0.0
    utterance_id: int | None = None
    utterance_frame: int | None = None
    audio_arrival: float | None = None
    created: float = 0.0


class SessionSink(Protocol):
    def on_frame(self, frame: OutputFrame) -> None:
        """Take a frame without blocking (apply a drop policy if behind)."""

    def on_event(self, event: BaseModel) -> None:
        """Take a control event without blocking; never dropped."""


@dataclass
class VideoSettings:
    width: int
    height: int
    bitrate: int
    gop_frames: int
    fps: int

    def as_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "bitrate": self.bitrate,
                "gop_frames": self.gop_frames, "fps": self.fps, "codec": "h264",
                "profile": "constrained-baseline", "format": "annexb"}


@dataclass
class _Playback:
    utterance_id: int | None = None
    last_image: np.ndarray | None = None
    frames: int = 0  # frames of the utterance shown
    skipped: int = 0  # frames of the utterance dropped because they were too late
    start_tick: int = 0  # the tick that showed frame 0: frame k is due at start_tick + k


@dataclass
class Session:
    session_id: str
    user_id: str
    avatar: Avatar
    engine: LipSyncEngine
    settings: Settings
    video: VideoSettings
    base_video: str
    clock: Clock = field(default_factory=Clock)
    transport: str = "websocket"

    def __post_init__(self) -> None:
        self.stream = self.engine.open_stream(self.avatar)
        self.cursor = Cursor(self.avatar, self.base_video, self.settings.action_crossfade_frames)
        self.machine = StateMachine(self._on_state_change)
        self.stats = SessionStats(self.clock.now())
        self.sinks: list[SessionSink] = []
        self._speech: deque[SpeechFrame] = deque()
        self._space = asyncio.Event()
        self._space.set()
        self._epoch = 0
        self._play = _Playback()
        self._last_audio = 0.0
        self._await_speech_until = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._after_frame: list[BaseModel] = []
        self._closed = False
        self._frame_period = 1.0 / self.video.fps

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._pace(), name=f"pacer-{self.session_id[:8]}"),
            asyncio.create_task(self._produce(), name=f"producer-{self.session_id[:8]}"),
        ]

    async def close(self) -> None:
        """Cancel the tasks and wait for them; idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.stream.interrupt()
        self.stream.close()
        self._speech.clear()
        self.sinks.clear()

    def add_sink(self, sink: SessionSink) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink: SessionSink) -> None:
        with contextlib.suppress(ValueError):
            self.sinks.remove(sink)

    def _event(self, event: BaseModel) -> None:
        for sink in list(self.sinks):
            sink.on_event(event)

    # ------------------------------------------------------------------ client requests
    def push_audio(self, pcm: np.ndarray, end_of_speech: bool = False) -> None:
        limit = int(self.settings.max_buffered_audio_s * SAMPLE_RATE)
        if self.stream.buffered_samples() + len(pcm) > limit:
            self.stats.audio_rejected_chunks += 1
            raise RateLimitExceeded(
                f"more than {self.settings.max_buffered_audio_s:g} s of audio is waiting to be "
                "rendered; send audio no faster than it can be played", {"dropped_samples": len(pcm)})
        self.stream.push_audio(pcm)
        self._last_audio = self.clock.now()
        self._await_speech_until = 0.0
        self.stats.audio_samples += len(pcm)
        if end_of_speech:
            self.stream.end_segment()

    def end_of_speech(self) -> None:
        self.stream.end_segment()

    def interrupt(self) -> None:
        """Stop speech at the next frame and drop everything queued."""
        self._epoch += 1
        self.stream.interrupt()
        self._speech.clear()
        self._space.set()
        uid = self._play.utterance_id
        if uid is not None:
            self._event(SpeechEnded(session_id=self.session_id, utterance_id=uid,
                                    frames=self._play.frames, skipped=self._play.skipped,
                                    interrupted=True))
        self._play = _Playback()
        self._await_speech_until = 0.0
        self.stats.interrupts += 1

    def change_state(self, target: AvatarState, base_video: str | None = None) -> None:
        self.machine.check(target, CLIENT_ALLOWED)
        if base_video is not None:
            old = self.cursor.base_video
            self.cursor.set_base_video(base_video)
            if old != base_video and target is self.machine.state:
                self._on_state_change(StateChange(target, target))
        if target is AvatarState.IDLE and self.machine.state is AvatarState.SPEAKING:
            self.interrupt()
            self.machine.move(AvatarState.IDLE)
        elif target is AvatarState.SPEAKING and self.machine.state is AvatarState.IDLE:
            self._await_speech_until = self.clock.now() + AWAIT_SPEECH_S
            self.machine.move(AvatarState.SPEAKING)

    def start_action(self, name: str, pcm: np.ndarray | None = None) -> None:
        self.cursor.start_action(name)
        self.stats.actions += 1
        if pcm is not None:
            self.push_audio(pcm, end_of_speech=True)

    # ------------------------------------------------------------------ state events
    def _on_state_change(self, change: StateChange) -> None:
        self.stats.state_changes += 1
        action = self.cursor.action.name if self.cursor.action else None
        self._event(StateChanged(session_id=self.session_id, previous_state=change.previous,
                                 current_state=change.current, base_video=self.cursor.base_video,
                                 action_name=action if change.current is AvatarState.ACTION else None))

    # ------------------------------------------------------------------ producer
    def _take_base(self) -> BaseFrame:
        return self.cursor.next()

    async def _produce(self) -> None:
        cap = self.settings.speech_queue_frames
        while True:
            await self._space.wait()
            epoch = self._epoch
            called = self.clock.now()
            try:
                frames = await self.stream.render_next(self._take_base, max(1, cap - len(self._speech)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad render must not end the session
                self._render_failed(exc)
                continue
            if epoch != self._epoch or not frames:
                continue
            self._account_render(frames, called)
            self._speech.extend(frames)
            if len(self._speech) >= cap:
                self._space.clear()

    def _account_render(self, frames: list[SpeechFrame], called: float) -> None:
        """Time from when the frames' audio was there (or the call began) to rendered."""
        arrivals = [f.audio_arrival for f in frames if f.audio_arrival is not None]
        ready = max(called, min(arrivals)) if arrivals else called
        self.stats.render_done(len(frames), self.clock.now() - ready)

    def _render_failed(self, exc: Exception) -> None:
        log.exception("session %s: rendering failed", self.session_id, exc_info=exc)
        self.stats.render_errors += 1
        self.interrupt()
        err = exc if isinstance(exc, ServiceError) else ProcessingError("rendering failed; speech dropped")
        self._event(ErrorMsg(code=err.code, message=err.message, details=err.details,
                             session_id=self.session_id))

    # ------------------------------------------------------------------ pacer
    async def _pace(self) -> None:
        period = self._frame_period
        t0 = self.clock.now()
        n = 0
        while True:
            deadline = t0 + n * period
            await self.clock.sleep_until(deadline)
            late = self.clock.now() - deadline
            if late > self.settings.resync_after_frames * period:
                skip = int(late // period)
                n += skip
                self.stats.skipped_frames += skip
            self._tick(n)
            n += 1

    def _tick(self, n: int) -> None:
        now = self.clock.now()
        if self.stream.ready_frames() == 0 and self._last_audio and \
                now - self._last_audio > self.settings.speech_gap_ms / 1000:
            self.stream.end_segment()  # the client went quiet: finish the utterance
            self._last_audio = 0.0
        frame = self._compose(n, now)
        if frame.state is not self.machine.state:
            self.machine.move(frame.state)
        self.stats.frame_emitted(now)
        for sink in list(self.sinks):
            sink.on_frame(frame)
        for event in self._after_frame:  # e.g. SPEECH_ENDED follows the utterance's last frame
            self._event(event)
        self._after_frame.clear()

    def _next_speech(self, n: int) -> SpeechFrame | None:
        if not self._speech:
            return None
        head = self._speech[0]
        if self._play.utterance_id != head.utterance_id:
            # prebuffer a little before starting an utterance, unless it is already complete
            complete = any(f.last for f in self._speech)
            if len(self._speech) < self.settings.prebuffer_frames and not complete:
                return None
            self._play.start_tick = n - head.index
        else:
            self._drop_late(n)
        frame = self._speech.popleft()
        self._space.set()
        return frame

    def _drop_late(self, n: int) -> None:
        """Keep video within ``max_speech_lag_frames`` of the utterance's schedule.

        Underruns (frames rendered late) push every later frame back by a tick; past the
        bound, queued frames that are already overdue are dropped (never the last one), so
        video neither drifts from the audio clock nor accumulates latency.
        """
        max_lag = self.settings.max_speech_lag_frames
        q = self._speech
        while len(q) > 1 and not q[0].last and q[0].utterance_id == self._play.utterance_id \
                and n - (self._play.start_tick + q[0].index) > max_lag:
            q.popleft()
            self._play.skipped += 1
            self.stats.speech_frames_skipped += 1

    def _compose(self, n: int, now: float) -> OutputFrame:
        ts = int(round(n * 1000 / self.video.fps))
        sf = self._next_speech(n)
        if sf is not None:
            return self._speech_output(sf, n, ts, now)
        if self._play.utterance_id is not None:  # underrun in the middle of an utterance
            self.stats.underruns += 1
            img = self._play.last_image
            assert img is not None
            return OutputFrame(n, ts, AvatarState.SPEAKING, img, SILENCE, created=now)
        base = self.cursor.next()
        if base.action is not None:
            state = AvatarState.ACTION
        elif now < self._await_speech_until:
            state = AvatarState.SPEAKING
        else:
            state = AvatarState.IDLE
        img = resize_to(base.image, self.video.width, self.video.height)
        return OutputFrame(n, ts, state, img, SILENCE, base.action, base.progress, created=now)

    def _speech_output(self, sf: SpeechFrame, n: int, ts: int, now: float) -> OutputFrame:
        img = resize_to(sf.image, self.video.width, self.video.height)
        self._play.utterance_id = sf.utterance_id
        self._play.last_image = img
        self._play.frames += 1
        self.stats.speech_frames += 1
        base = sf.base
        action = base.action if base is not None else None
        state = AvatarState.ACTION if action else AvatarState.SPEAKING
        out = OutputFrame(n, ts, state, img, sf.pcm, action, base.progress if base else 0.0,
                          sf.utterance_id, sf.index, sf.audio_arrival, now)
        if sf.last:
            self._after_frame.append(SpeechEnded(session_id=self.session_id, utterance_id=sf.utterance_id,
                                                 frames=self._play.frames, skipped=self._play.skipped))
            self._play = _Playback()
        return out

    # ------------------------------------------------------------------ reporting
    def frame_sent(self, frame: OutputFrame, now: float) -> None:
        self.stats.frame_sent(frame.audio_arrival, frame.created, now)

    def describe(self) -> dict[str, Any]:
        now = self.clock.now()
        return {"session_id": self.session_id, "user_id": self.user_id,
                "transport": self.transport, "state": self.machine.state.value,
                "avatar": self.avatar.avatar_id, "base_video": self.cursor.base_video,
                "video": self.video.as_dict(), "speech_queue": len(self._speech),
                "buffered_audio_ms": round(self.stream.buffered_samples() / 16.0),
                **self.stats.snapshot(now)}

