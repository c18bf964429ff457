"""A streaming session: control, state and lifecycle; transports attach as sinks.

The work is split three ways:

* :class:`~.producer.Producer` turns audio into rendered speech frames (engine stream) on a
  bounded :class:`~.producer.SpeechQueue`;
* :class:`~.playout.Playout` emits exactly one frame per period on absolute deadlines; the
  session is its :class:`~.playout.PlayoutHost` and asks things of it through methods;
* this module takes the client's requests (audio, state changes, actions, interrupts), owns
  the state machine and the one rule for where an utterance ends, and hands every frame and
  event to the attached sinks (WebSocket, WebRTC), each with its own bounded drop policy.

The session speaks in domain events (:mod:`.events`) and errors; :mod:`.wire` turns them
into protocol messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol

import numpy as np

from .audio_tap import AudioTap
from .avatars.model import Avatar
from .bridge import Bridge
from .clock import Clock
from .config import Settings
from .cursor import Cursor
from .engines.base import LipSyncEngine, LipSyncStream
from .errors import InvalidSession, RateLimitExceeded, ServiceError
from .events import ActionTriggered, SessionEvent, SpeechEnded, StateChanged
from .pacing import PhaseSpreader
from .playout import SILENCE, OutputFrame, Playout
from .producer import Producer, SpeechQueue
from .states import CLIENT_ALLOWED, AvatarState, StateMachine
from .stats import SessionStats
from .units import SAMPLE_RATE

__all__ = ["SILENCE", "OutputFrame", "Session", "SessionSink", "VideoSettings"]

AWAIT_SPEECH_S = 2.0
_P = ParamSpec("_P")


def _weakly(method: Callable[_P, None]) -> Callable[_P, None]:
    """``method`` without a strong reference to its object (a no-op once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: _P.args, **kwargs: _P.kwargs) -> None:
        bound = ref()
        if bound is not None:
            bound(*args, **kwargs)

    return call


class SessionSink(Protocol):
    def on_frame(self, frame: OutputFrame) -> None:
        """Take a frame without blocking (apply a drop policy if behind)."""

    def on_event(self, event: SessionEvent | ServiceError) -> None:
        """Take a control event without blocking; never dropped."""


@dataclass
class VideoSettings:
    width: int
    height: int
    bitrate: int
    gop_frames: int
    fps: int

    def as_dict(self) -> dict[str, Any]:
        return {"resolution": f"{self.width}x{self.height}", "width": self.width,
                "height": self.height, "bitrate": self.bitrate, "gop_frames": self.gop_frames,
                "fps": self.fps, "codec": "h264", "profile": "constrained-baseline",
                "format": "annexb"}


class _SpeechInput:
    """Audio in, and the one rule for where an utterance ends: the client says so (END_OF_SPEECH,
    ``end_of_speech`` on GENERATE) or no audio came for ``speech_gap_ms``.

    It holds what it uses, not the session (no reference cycle); the session calls
    :meth:`end_if_quiet` before every tick."""

    def __init__(self, settings: Settings, stream: LipSyncStream, stats: SessionStats,
                 clock: Clock) -> None:
        self.settings, self.stream, self.stats, self.clock = settings, stream, stats, clock
        self.last_audio = 0.0  # 0: no utterance receiving audio

    def push(self, pcm: np.ndarray, end: bool) -> None:
        limit = int(self.settings.max_buffered_audio_s * SAMPLE_RATE)
        if self.stream.buffered_samples() + len(pcm) > limit:
            self.stats.audio_rejected()
            raise RateLimitExceeded(
                f"more than {self.settings.max_buffered_audio_s:g} s of audio is waiting to be "
                "rendered; send audio no faster than it can be played", {"dropped_samples": len(pcm)})
        self.stream.push_audio(pcm)
        self.stats.audio_received(len(pcm))
        self.last_audio = self.clock.now()
        if end:
            self.end()

    def end(self) -> None:
        self.stream.end_segment()
        self.last_audio = 0.0

    def end_if_quiet(self, now: float) -> None:
        gap = self.settings.speech_gap_ms / 1000
        if self.last_audio and now - self.last_audio > gap and self.stream.ready_frames() == 0:
            self.end()


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
    #: the process's playouts' phases (the manager's): None ticks from the start
    phases: PhaseSpreader | None = None

    def __post_init__(self) -> None:
        self.stream = self.engine.open_stream(self.avatar, self.clock.now)
        self.cursor = Cursor(self.avatar, self.base_video, self.settings.action_crossfade_frames)
        self.machine = StateMachine()
        self.stats = SessionStats(self.clock.now())
        self.sinks: list[SessionSink] = []
        self.queue = SpeechQueue(self.settings.speech_queue_frames)
        self.speech = _SpeechInput(self.settings, self.stream, self.stats, self.clock)
        # the parts hold the session weakly, so that a closed session is freed by reference
        # counting at once instead of waiting, with its stream and images, for a full garbage
        # collection
        self.playout = Playout(self.settings, self.video.fps, (self.video.width, self.video.height),
                               self.cursor, self.queue, self.clock, self.stats, self)
        self.producer = Producer(self.stream, self.queue, self.playout.speech_base, self.clock,
                                 self.stats, _weakly(self._render_failed))
        self.mic = AudioTap()  # audio a WebRTC peer sends in, for applications (ASR)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.playout.run(self.phases), name=f"pacer-{self.session_id[:8]}"),
            asyncio.create_task(self.producer.run(), name=f"producer-{self.session_id[:8]}"),
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
        self._tasks.clear()
        self.stream.interrupt()
        self.stream.close()
        self.queue.flush()
        self.sinks.clear()
        self.mic.close()

    def add_sink(self, sink: SessionSink) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink: SessionSink) -> None:
        with contextlib.suppress(ValueError):
            self.sinks.remove(sink)

    def _event(self, event: SessionEvent | ServiceError) -> None:
        for sink in list(self.sinks):
            sink.on_event(event)

    # ------------------------------------------------------------------ client requests
    def push_audio(self, pcm: np.ndarray, end_of_speech: bool = False) -> None:
        self.speech.push(pcm, end_of_speech)
        self.playout.await_speech(0.0)  # audio came: no more waiting for it

    def end_of_speech(self) -> None:
        self.speech.end()

    def set_speech_video(self, name: str) -> None:
        """The base clip later speech is rendered on (upstream name or clip name)."""
        self.cursor.set_speech_video(name)

    def interrupt(self) -> None:
        """Stop speech at the next frame and drop everything queued."""
        self.queue.flush()
        self.stream.interrupt()
        self.speech.last_audio = 0.0
        ended = self.playout.interrupted()
        if ended is not None:
            self._event(ended)
        self.stats.interrupted()

    def change_state(self, target: AvatarState, base_video: str | None = None) -> None:
        """A client's STATE_CHANGE: ``base_video`` is the idle loop for ``idle`` and the base
        of later speech for ``speaking``."""
        self.machine.check(target, CLIENT_ALLOWED)
        if base_video is not None:
            if target is AvatarState.SPEAKING:
                self.cursor.set_speech_video(base_video)
            else:
                self.cursor.set_base_video(base_video)
        current = self.machine.state
        if target is AvatarState.IDLE and current is AvatarState.SPEAKING:
            self.interrupt()
            self._move(AvatarState.IDLE)
        elif target is AvatarState.SPEAKING and current is AvatarState.IDLE:
            self.playout.await_speech(self.clock.now() + AWAIT_SPEECH_S)
            self._move(AvatarState.SPEAKING)
        else:  # already there: confirm (with the base video now in use)
            self._event(StateChanged(current, current, self._clip_for(current)))

    def start_action(self, name: str, pcm: np.ndarray | None = None,
                     legacy: bool = False) -> ActionTriggered:
        """Splice in an action clip (by upstream or own name). ``legacy``: the v1.0 form, whose
        frames go out as ACTION_FRAME. With ``pcm``, that audio is lip-synced over the clip."""
        clip = self.cursor.start_action(name)
        if legacy:
            self.playout.mark_legacy_action(clip)
        self.stats.action_started()
        if pcm is not None:
            self.push_audio(pcm, end_of_speech=True)
        return ActionTriggered(clip, len(self.avatar.clip(clip)))

    def open_bridge(self, fmt: str = "rgb24") -> Bridge:
        """Show an external renderer's frames and audio instead of the engine's (see bridge.py)."""
        if self.playout.bridge is not None:
            raise InvalidSession("this session already has a media bridge",
                                 {"session_id": self.session_id})
        bridge = Bridge(self.video.width, self.video.height, fmt)
        self.playout.attach_bridge(bridge)
        return bridge

    def close_bridge(self, bridge: Bridge) -> None:
        if self.playout.bridge is bridge:
            self.playout.attach_bridge(None)

    # ------------------------------------------------------------------ the playout's host
    def before_tick(self, now: float) -> None:
        self.speech.end_if_quiet(now)

    def speech_pending(self) -> bool:
        return self.queue.drawn > 0 or self.stream.buffered_samples() > 0

    def audio_backlog(self) -> int:
        return self.stream.buffered_samples()

    def speech_delay(self) -> float:
        return self.stream.speech_delay()

    def lookahead_frames(self) -> int:
        return self.engine.lookahead_frames

    def emit(self, frame: OutputFrame, after: list[SpeechEnded]) -> None:
        """The playout's frame of this tick to every sink, then the SPEECH_ENDED it brought."""
        self._move(frame.state, frame.clip)
        for sink in list(self.sinks):
            sink.on_frame(frame)
        for event in after:
            self._event(event)

    def _move(self, target: AvatarState, clip: str = "") -> None:
        change = self.machine.move(target)
        if change is not None:
            self.stats.state_changed()
            self._event(StateChanged(change.previous, change.current,
                                     clip or self._clip_for(change.current)))

    def _clip_for(self, state: AvatarState) -> str:
        if state is AvatarState.ACTION and self.cursor.action is not None:
            return self.cursor.action.name
        return self.cursor.speaking_clip if state is AvatarState.SPEAKING else self.cursor.base_video

    def _render_failed(self, err: ServiceError) -> None:
        self.interrupt()
        self._event(err)

    # ------------------------------------------------------------------ reporting
    def frame_sent(self, frame: OutputFrame, now: float) -> None:
        self.stats.frame_sent(frame.audio_arrival, frame.created, now)

    def describe(self) -> dict[str, Any]:
        now = self.clock.now()
        names = self.avatar.names
        return {"session_id": self.session_id, "user_id": self.user_id,
                "transport": self.transport, "state": self.machine.state.value,
                "avatar": self.avatar.avatar_id, "base_video": names.public(self.cursor.base_video),
                "speech_video": names.public(self.cursor.speaking_clip),
                "video": self.video.as_dict(), "speech_queue": len(self.queue),
                "buffered_audio_ms": round(self.stream.buffered_samples() * 1000 / SAMPLE_RATE),
                **self.stats.snapshot(now)}
