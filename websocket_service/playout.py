"""The playout: exactly one frame per period on absolute deadlines, speech when due, else the loop.

It paces with the one pacing rule (:class:`~.pacing.Pacer`: frame ``n`` due at ``t0 + n *
period``; more than ``resync_after_frames`` behind, skip ahead, counted). Each tick takes the
next speech frame when one is due (:class:`SpeechSchedule`: after a small prebuffer at an
utterance's start; speech that fell behind drops overdue frames past
``max_speech_lag_frames`` and silent frames below it), repeats the last speech picture on an
underrun inside an utterance, and otherwise shows the idle loop or the action clip from the
:class:`~.cursor.Cursor`.

The session talks to it through methods (:meth:`Playout.await_speech`,
:meth:`Playout.mark_legacy_action`, :meth:`Playout.attach_bridge`, ...); what the playout asks
of the session is the small :class:`PlayoutHost` interface.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .avatars.model import BaseFrame
from .bridge import Bridge
from .clock import Clock
from .config import Settings
from .cursor import Cursor, loop_period
from .engines.base import SpeechFrame
from .events import SpeechEnded
from .media.picture import resize_to
from .pacing import Pacer, PhaseSpreader
from .producer import SpeechQueue
from .states import AvatarState
from .stats import SessionStats
from .units import SAMPLES_PER_FRAME

SILENCE = np.zeros(SAMPLES_PER_FRAME, np.int16)
QUIET_RMS = 100.0  # int16 RMS of a frame's audio below which it is a pause (about -50 dBFS)
STANDING_TICKS = 50  # a backlog that stood this long (2 s at 25 fps) is trimmed in pauses ...
STANDING_FRAMES = 3  # ... down to this many frames (queued, or audio not yet rendered)
STANDING_SLACK = 4  # "stood": the backlog varied by at most this many frames meanwhile


def _quiet(pcm: np.ndarray) -> bool:
    return float(np.mean(np.square(pcm, dtype=np.float32))) < QUIET_RMS**2


@dataclass
class OutputFrame:
    """One frame of the session's timeline, before any transport encodes it."""

    index: int
    timestamp_ms: int
    state: AvatarState
    image: np.ndarray  # RGB or I420 (media.picture) at the session's output size
    pcm: np.ndarray  # the 640 samples of audio that play with this frame (silence if idle)
    clip: str = ""  # the base clip (or action clip) this frame shows
    action: str | None = None
    progress: float = 0.0
    utterance_id: int | None = None
    utterance_frame: int | None = None
    audio_arrival: float | None = None
    created: float = 0.0
    audio_ms: int | None = None  # speech: where its audio starts in the session's audio
    legacy_action: bool = False  # an action started in the v1.0 form: sent as ACTION_FRAME
    loop_pos: int | None = None  # a plain loop frame: its position in the clip's loop period


@dataclass
class _Playback:
    utterance_id: int | None = None
    last: OutputFrame | None = None  # the utterance's last frame shown (repeated on underruns)
    frames: int = 0  # frames of the utterance shown
    skipped: int = 0  # frames of the utterance dropped because they were too late
    start_tick: int = 0  # the tick that showed frame 0: frame k is due at start_tick + k
    #: (audio arrival, index) of the frame it started with, and the jitter allowance its
    #: schedule was set with (:meth:`SpeechSchedule._reanchor`)
    anchor: tuple[float, int] | None = None
    delay: float = 0.0


class SpeechSchedule:
    """Which speech frame a tick shows: the utterance in play, its schedule, and its drops.

    An utterance starts after a small prebuffer (at once when it is complete), no earlier
    than its audio's arrival plus the engine's jitter allowance, or right on the tick after
    the last one when it follows back to back; frame ``k`` is then due at ``start_tick + k``.
    Frames that fell behind are dropped past ``max_speech_lag_frames`` and, below it, in
    pauses; a backlog that stands is trimmed in pauses too.

    With the playout's pacer as :attr:`grid` (``ALIGN_TICKS_TO_SPEECH``), the ticks line up
    with the schedule instead of the schedule being rounded up to the next tick: an utterance
    starts exactly when its allowance has passed, and the ticks follow the allowance's later
    moves (see :meth:`_align_start` and :meth:`_reanchor`).
    """

    #: how far the allowance must move before an aligned schedule follows it (a smaller move
    #: would only nudge the ticks by a millisecond or two, often)
    REANCHOR_MIN_S = 0.01
    #: slack on the start time for the tick that was moved onto it (float rounding)
    EPSILON_S = 1e-6

    def __init__(self, settings: Settings, period: float, queue: SpeechQueue,
                 stats: SessionStats) -> None:
        self.settings = settings
        self.period = period
        self.queue = queue
        self.stats = stats
        self.play = _Playback()
        #: the tick after the last utterance's last frame was due, while its successor may
        #: follow on the very next tick (see :meth:`next`)
        self._follow_due: int | None = None
        self._follow_delay = 0.0  # the allowance that schedule was set with
        #: speech backlog in frames (queued + audio not rendered) at each speech tick (reset
        #: by any other frame)
        self._depths: deque[int] = deque(maxlen=STANDING_TICKS)
        #: the playout's pacer while it runs, when its ticks may move to line up with an
        #: utterance's schedule; None: ticks stay where they are (the schedule is rounded)
        self.grid: Pacer | None = None

    def shown(self, sf: SpeechFrame, out: OutputFrame) -> SpeechEnded | None:
        """``sf`` went out as ``out``; the utterance's SPEECH_ENDED if it was its last frame."""
        self.play.utterance_id = sf.utterance_id
        self.play.frames += 1
        self.stats.speech_frame_shown()
        self.play.last = out
        self._follow_due = None
        if not sf.last:
            return None
        ended = SpeechEnded(sf.utterance_id, self.play.frames, self.play.skipped)
        self._follow_due = self.play.start_tick + sf.index + 1
        self._follow_delay = self.play.delay
        self.play = _Playback()
        return ended

    def no_speech(self) -> OutputFrame | None:
        """A tick without a speech frame: the next utterance starts afresh. The utterance's
        last frame shown when this is an underrun inside it (to hold), else None."""
        self._follow_due = None
        self._depths.clear()
        return self.play.last

    def reset(self) -> SpeechEnded | None:
        """Forget the utterance in play; its SPEECH_ENDED (interrupted) if there was one."""
        p, self.play = self.play, _Playback()
        self._follow_due = None
        self._depths.clear()
        if p.utterance_id is None:
            return None
        return SpeechEnded(p.utterance_id, p.frames, p.skipped, interrupted=True)

    def next(self, host: PlayoutHost, n: int, now: float) -> SpeechFrame | None:
        """The speech frame tick ``n`` shows, if one is due (dropping those too late)."""
        q = self.queue.frames
        if not q:
            return None
        head = q[0]
        if self.play.utterance_id != head.utterance_id:
            # prebuffer a little before starting an utterance, unless it is already complete
            complete = any(f.last for f in q)
            if len(q) < self.settings.prebuffer_frames and not complete:
                return None
            # and start it no earlier than its audio's arrival plus the engine's jitter
            # allowance: later frames then keep their slots although they come in bursts
            delay = host.speech_delay()
            if delay > 0 and head.audio_arrival is not None and self._follow_due is None \
                    and now < head.audio_arrival + delay - self.EPSILON_S:
                self._align_start(head.audio_arrival + delay, now)
                return None
            self.play.start_tick = n - head.index
            self.play.delay = delay
            if head.audio_arrival is not None:
                self.play.anchor = (head.audio_arrival, head.index)
            if self._follow_due is not None:
                self.play.delay = self._follow_delay
                # back to back with the last utterance (its audio came while that one played):
                # it continues that schedule, so a lag the last one had is still a lag here
                # (dropped past the bound) instead of becoming queued frames, i.e. latency
                self.play.start_tick = min(self.play.start_tick, self._follow_due - head.index)
        else:
            self._reanchor(host, n, now)
            self._drop_late(n)
            if self.settings.catch_up_in_pauses:
                self._trim_standing_backlog(host)
        return self.queue.popleft()

    def _align_start(self, start: float, now: float) -> None:
        """Move the ticks so that one falls at ``start``, when the utterance waiting at this
        tick (``now``) may start. Unaligned, it starts on the first tick after: 0-40 ms later,
        20 on average, and at a session's fixed offset between its client's audio and its
        ticks, the same share for all its utterances (at 16 sessions the sessions' latencies
        spread over 40 ms for that alone). The next tick moves (at most half a period later,
        or earlier) once ``start`` is within one and a half periods."""
        grid = self.grid
        if grid is not None and start - now <= 1.5 * self.period:
            grid.shift(start - grid.due(grid.n))

    def _reanchor(self, host: PlayoutHost, n: int, now: float) -> None:
        """Set the utterance's schedule again when the engine's jitter allowance has moved by
        more than a frame period since it was set.

        The schedule is what a frame's lateness is measured against: past
        ``max_speech_lag_frames`` frames are dropped, and below it silent ones are dropped in
        pauses to catch up (frames are never held back for it). An utterance that started
        before the allowance was learned (a cold start: no latency measured yet) or that
        followed such a one back to back (keeping its schedule) has a schedule tighter than
        the allowance by all of it. Its underruns shift the playout later, as they should, but
        then every pause was cut to catch up with the tight schedule, and the next burst of
        frames ran late again: at 16 MuseTalk sessions 59% of such utterances' frames came
        after their slots, against 5% of the others'. So the schedule follows the allowance:
        later at once, earlier by at most ``max_speech_lag_frames`` a time (catching up in
        pauses does the rest). The period of slack keeps the allowance's small moves from
        moving it.

        With a :attr:`grid`, the schedule follows the allowance by :data:`REANCHOR_MIN_S`
        instead, exactly: the ticks move by the part of the change within a period (later or
        earlier: each frame from now on goes out that much later or earlier), and whole
        periods move the schedule as above. An utterance started before the allowance was
        learned, or off its ticks, is lined up the same way.
        """
        anchor = self.play.anchor
        delay = host.speech_delay()
        grid = self.grid
        slack = self.period if grid is None else self.REANCHOR_MIN_S
        if anchor is None or abs(delay - self.play.delay) <= slack:
            return
        arrival, index = anchor
        self.play.delay = delay
        if grid is None:
            # the first tick at or after the allowance, as an utterance starting now would get
            start = n + math.ceil((arrival + delay - now) / self.period) - index
        else:
            # where the allowance puts frame 0, against where the schedule has it now
            moved = (arrival + delay - index * self.period) - grid.due(self.play.start_tick)
            whole = int(moved / self.period)  # toward zero: the rest moves the ticks
            grid.shift(moved - whole * self.period)
            start = self.play.start_tick + whole
        head = self.queue.frames[0].index
        self.play.start_tick = max(start, n - head - self.settings.max_speech_lag_frames)

    def _droppable(self) -> bool:
        """The head may be dropped: of the utterance in play, not its last, not alone."""
        q = self.queue.frames
        return len(q) > 1 and not q[0].last and q[0].utterance_id == self.play.utterance_id

    def _skip_head(self) -> None:
        self.queue.popleft()
        self.play.skipped += 1
        self.stats.speech_frame_dropped()

    def _drop_late(self, n: int) -> None:
        """Keep video within ``max_speech_lag_frames`` of the utterance's schedule.

        Underruns (frames rendered late) push every later frame back by a tick; past the
        bound, queued frames that are already overdue are dropped (never the last one), so
        video neither drifts from the audio clock nor accumulates latency. Within the bound
        (``catch_up_in_pauses``), silent frames are dropped while behind: a pause absorbs
        the lag (no visible skip, no latency kept).
        """
        max_lag = self.settings.max_speech_lag_frames
        catch_up = self.settings.catch_up_in_pauses
        q = self.queue.frames
        while self._droppable():
            late = n - (self.play.start_tick + q[0].index)
            if not (late > max_lag or (catch_up and late > 0 and _quiet(q[0].pcm))):
                break
            self._skip_head()

    def _trim_standing_backlog(self, host: PlayoutHost) -> None:
        """A live stream that burst after a stall (a client or network hiccup) leaves a backlog
        for good: audio keeps coming at the rate it plays, so frames queued (and audio waiting
        to be rendered) never drain, and every frame waits as long. Such a backlog *stands*:
        it holds steady for ``STANDING_TICKS`` and the utterance is still open; a burst being
        played out (TTS) drains instead. A standing backlog loses its silent frames, one per
        tick, down to ``STANDING_FRAMES`` over what a stream on schedule holds: the engine's
        jitter allowance and its look-ahead (audio that arrived for frames that cannot render
        until the audio after them has come) in frames."""
        q = self.queue.frames
        depths = self._depths
        depths.append(len(q) + host.audio_backlog() // SAMPLES_PER_FRAME)
        # the engine's jitter allowance and look-ahead are backlog it needs, not latency to
        # trim: counting only the allowance, a MuseTalk stream on schedule (look-ahead 4
        # frames) stood above the floor and lost a silent frame every pause, which put its
        # frames a tick tighter (14% of them shown a tick before their slot at 16 sessions)
        floor = (STANDING_FRAMES + int(host.speech_delay() / self.period)
                 + host.lookahead_frames())
        if len(depths) < STANDING_TICKS or min(depths) <= floor:
            return
        if max(depths) - min(depths) > STANDING_SLACK:
            return
        if not self._droppable() or not _quiet(q[0].pcm) or any(f.last for f in q):
            return
        self._skip_head()
        self._depths = deque((d - 1 for d in depths), maxlen=STANDING_TICKS)


def _held(last: OutputFrame, n: int, ts: int, now: float) -> OutputFrame:
    """Frame ``n`` showing ``last``'s picture again, in silence."""
    return OutputFrame(n, ts, last.state, last.image, SILENCE, last.clip, last.action,
                       last.progress, created=now, legacy_action=last.legacy_action)


class PlayoutHost(Protocol):
    """What the playout asks of the session that runs it (the session implements it)."""

    def before_tick(self, now: float) -> None:
        """Called first on every tick (the session ends an utterance whose audio stopped)."""

    def speech_pending(self) -> bool:
        """Whether the producer is drawing base frames for speech (rendering, or audio waits)."""

    def audio_backlog(self) -> int:
        """Samples of audio received and not rendered yet."""

    def speech_delay(self) -> float:
        """Seconds after its audio arrived that an utterance's first frame may start (an
        engine that renders in batches delivers frames with its batch cycle's jitter)."""

    def lookahead_frames(self) -> int:
        """Frames of audio after a frame's own slot that the engine needs to render it."""

    def emit(self, frame: OutputFrame, ended: list[SpeechEnded]) -> None:
        """Hand the tick's frame on, then the utterances it ended (SPEECH_ENDED)."""


class Playout:
    """One frame per tick, for the session that is its :class:`PlayoutHost`.

    The playout is the one owner of the :class:`~.cursor.Cursor`: it advances it for every
    loop or action frame it shows, and the producer draws the base frames it renders speech
    on through :meth:`speech_base` (ahead of their ticks: speech is rendered in advance).
    It holds its host weakly, so that a session nobody holds is freed at once; once the host
    is gone the playout stops.
    """

    def __init__(self, settings: Settings, fps: int, size: tuple[int, int], cursor: Cursor,
                 queue: SpeechQueue, clock: Clock, stats: SessionStats,
                 host: PlayoutHost) -> None:
        self.settings = settings
        self.period = 1.0 / fps
        self.fps = fps
        self.width, self.height = size
        self.cursor = cursor
        self.queue = queue
        self.clock = clock
        self.stats = stats
        self._host = weakref.ref(host)
        self.last: OutputFrame | None = None
        self.bridge: Bridge | None = None  # an external renderer's frames, when attached
        self.speech = SpeechSchedule(settings, self.period, queue, stats)
        self._await_speech_until = 0.0  # STATE_CHANGE speaking: speaking frames before audio
        self._legacy_action: str | None = None

    async def run(self, phases: PhaseSpreader | None = None) -> None:
        """Tick until the host is gone; with ``phases``, on a phase the process's other
        playouts use least (the first tick waits up to one period)."""
        slot, t0 = None, self.clock.now()
        phase = t0 % self.period
        if phases is not None:
            slot, t0 = phases.claim(t0)
            phase = phases.phase(slot)
        self.stats.tick_phase_ms = round(phase * 1000, 1)
        pacer = Pacer(self.clock, self.fps, self.settings.resync_after_frames, t0=t0)
        if self.settings.align_ticks_to_speech:
            self.speech.grid = pacer
        try:
            while self._host() is not None:
                n, skipped = await pacer.next()
                if skipped:
                    self.stats.frames_skipped(skipped)
                await self.grace(pacer.due(n))
                self.tick(n)
                if pacer.t0 is not None and pacer.t0 != t0:  # ticks moved to line up with speech
                    t0 = pacer.t0
                    self.stats.tick_phase_ms = round(pacer.phase() * 1000, 1)
                    if phases is not None and slot is not None:
                        slot = phases.move(slot, pacer.phase())
        finally:
            self.speech.grid = None
            if phases is not None and slot is not None:
                phases.release(slot)

    async def grace(self, due: float) -> None:
        """Before the tick due at ``due``: inside an utterance whose next frame is still being
        rendered, wait for it until ``due`` + ``speech_grace_ms``. The frame then goes out that
        much late (its timestamp unchanged: a client that plays by timestamps does not see it)
        instead of the last picture held in its place, an underrun, which pushes the rest of
        the utterance back a frame until a pause. Measured at 16 speaking MuseTalk stand-in
        sessions: 15 ms turned about half the underruns into such waits (docs/BENCHMARKS.md
        section 4)."""
        grace = self.settings.speech_grace_ms / 1000.0
        host = self._host()
        if grace <= 0 or host is None or self.queue.frames or self.bridge is not None:
            return
        if self.speech.play.utterance_id is None or not host.speech_pending():
            return
        self.queue.arrived.clear()
        arrived = asyncio.ensure_future(self.queue.arrived.wait())
        timer = asyncio.ensure_future(self.clock.sleep_until(due + grace))
        try:
            await asyncio.wait((arrived, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
            timer.cancel()
        if self.queue.frames:
            self.stats.speech_frame_waited()

    def tick(self, n: int) -> None:
        """Show frame ``n`` (due now): compose it and hand it to the host."""
        host = self._host()
        if host is None:
            return
        now = self.clock.now()
        host.before_tick(now)
        ended: list[SpeechEnded] = []
        frame = self._compose(host, n, now, ended)
        self.last = frame
        self.stats.frame_emitted(now)
        host.emit(frame, ended)

    # ------------------------------------------------------------------ the session's requests
    def await_speech(self, until: float) -> None:
        """Show speaking frames (of the speech base) before any audio, until ``until``
        (STATE_CHANGE speaking); 0: stop waiting (audio came)."""
        self._await_speech_until = until

    def mark_legacy_action(self, clip: str) -> None:
        """The action ``clip`` was started in the v1.0 form: its frames say so
        (:attr:`OutputFrame.legacy_action`, sent as ACTION_FRAME) until it ends."""
        self._legacy_action = clip

    def attach_bridge(self, bridge: Bridge | None) -> None:
        """Show ``bridge``'s frames instead of the session's own while it has any; None:
        detach it."""
        self.bridge = bridge

    def speech_base(self) -> BaseFrame:
        """The next base frame to render speech on, drawn by the producer ahead of its tick
        (counted in :attr:`SpeechQueue.drawn` until that frame is shown or dropped)."""
        self.queue.drawn += 1
        return self.cursor.next(speech=True)

    def interrupted(self) -> SpeechEnded | None:
        """Forget the utterance in play; its SPEECH_ENDED (interrupted) if there was one."""
        self._await_speech_until = 0.0
        return self.speech.reset()

    # ------------------------------------------------------------------ composing
    def _compose(self, host: PlayoutHost, n: int, now: float,
                 ended: list[SpeechEnded]) -> OutputFrame:
        ts = int(round(n * 1000 / self.fps))
        if self.bridge is not None and (got := self.bridge.take(now)) is not None:
            img, pcm, speaking = got
            state = AvatarState.SPEAKING if speaking else AvatarState.IDLE
            return OutputFrame(n, ts, state, resize_to(img, self.width, self.height), pcm,
                               "bridge", created=now)
        sf = self.speech.next(host, n, now)
        if sf is not None:
            return self._speech_output(sf, n, ts, now, ended)
        last = self.speech.no_speech()
        if last is not None:  # underrun in the middle of an utterance: hold the last picture
            self.stats.underrun()
            return _held(last, n, ts, now)
        if self.cursor.action is not None and self.last is not None and host.speech_pending():
            # the producer is drawing this action's next frames for speech: hold the picture
            # rather than advance the clip here and show its frames out of order
            return _held(self.last, n, ts, now)
        speaking = now < self._await_speech_until
        base = self.cursor.next(speech=speaking)
        if base.action is not None:
            state = AvatarState.ACTION
        elif speaking:
            state = AvatarState.SPEAKING
        else:
            state = AvatarState.IDLE
        img = resize_to(base.image, self.width, self.height)
        pos = None
        if base.action is None:
            pos = (self.cursor.pos - 1) % loop_period(len(self.cursor.avatar.clip(base.clip)))
        return OutputFrame(n, ts, state, img, SILENCE, base.clip, base.action, base.progress,
                           created=now, legacy_action=self._legacy(base.action, base.progress),
                           loop_pos=pos)

    def _legacy(self, action: str | None, progress: float) -> bool:
        legacy = action is not None and action == self._legacy_action
        if legacy and progress >= 1.0:
            self._legacy_action = None
        return legacy

    def _speech_output(self, sf: SpeechFrame, n: int, ts: int, now: float,
                       ended: list[SpeechEnded]) -> OutputFrame:
        img = resize_to(sf.image, self.width, self.height)
        base = sf.base
        action = base.action if base is not None else None
        progress = base.progress if base is not None else 0.0
        state = AvatarState.ACTION if action else AvatarState.SPEAKING
        out = OutputFrame(n, ts, state, img, sf.pcm, base.clip if base else "", action, progress,
                          sf.utterance_id, sf.index, sf.audio_arrival, now, sf.audio_ms,
                          self._legacy(action, progress))
        if (end := self.speech.shown(sf, out)) is not None:
            ended.append(end)  # SPEECH_ENDED follows the utterance's last frame
        return out
