"""The session's playout, speech input and control on a fake clock: no sockets, no pacer task.

Each test drives ticks by hand (``playout.tick(n)``) and renders speech by awaiting the real
weight-free engine's stream, so every step is deterministic.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from websocket_service.clock import Clock
from websocket_service.config import Settings
from websocket_service.errors import InvalidStateTransition, ProcessingError, ServiceError
from websocket_service.events import SpeechEnded, StateChanged
from websocket_service.pacing import Pacer, PhaseSpreader
from websocket_service.playout import OutputFrame
from websocket_service.session import Session, VideoSettings
from websocket_service.states import AvatarState

from .geometric_support import builtin, engine, wav


class FakeClock(Clock):
    """Time moves only when a test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        raise AssertionError("these tests drive the playout with tick(), not the pacer task")


class Sink:
    def __init__(self) -> None:
        self.frames: list[OutputFrame] = []
        self.events: list[Any] = []

    def on_frame(self, frame: OutputFrame) -> None:
        self.frames.append(frame)

    def on_event(self, event: Any) -> None:
        self.events.append(event)


@pytest.fixture
def session() -> tuple[Session, Sink, FakeClock]:
    clock = FakeClock()
    settings = Settings(max_speech_lag_frames=2, speech_gap_ms=300)
    video = VideoSettings(width=512, height=512, bitrate=1_000_000, gop_frames=25, fps=25)
    s = Session("s1", "u1", builtin(), engine(), settings, video, "idle", clock=clock)
    sink = Sink()
    s.add_sink(sink)
    return s, sink, clock


async def render_ready(s: Session) -> int:
    """Render every frame the stream can render now onto the speech queue."""
    n = 0
    while s.stream.ready_frames():
        frames = await s.stream.render_next(s.producer.take_base, 64)
        s.queue.extend(frames)
        n += len(frames)
    return n


def tick(s: Session, clock: FakeClock, start: int, count: int) -> None:
    for n in range(start, start + count):
        clock.t += 0.04
        s.playout.tick(n)


def states(sink: Sink) -> list[tuple[str, str]]:
    return [(e.previous.value, e.current.value) for e in sink.events if isinstance(e, StateChanged)]


async def test_idle_ticks_show_the_loop_with_exact_timestamps(session):
    s, sink, clock = session
    tick(s, clock, 0, 10)
    assert [f.index for f in sink.frames] == list(range(10))
    assert [f.timestamp_ms for f in sink.frames] == [40 * n for n in range(10)]
    assert {f.state for f in sink.frames} == {AvatarState.IDLE}
    assert {f.clip for f in sink.frames} == {"idle"}
    assert all(f.pcm.shape == (640,) and not f.pcm.any() for f in sink.frames)
    assert sink.events == []
    await s.close()


async def test_an_utterance_plays_one_frame_per_40ms_then_returns_to_idle(session):
    s, sink, clock = session
    pcm = wav("short_16k.wav")  # 1.2 s
    s.push_audio(pcm, end_of_speech=True)
    assert await render_ready(s) == 30
    tick(s, clock, 0, 32)
    speech = [f for f in sink.frames if f.utterance_id is not None]
    assert [f.utterance_frame for f in speech] == list(range(30))
    assert [f.audio_ms for f in speech] == [40 * k for k in range(30)]
    assert np.array_equal(np.concatenate([f.pcm for f in speech]), pcm)  # the audio in sync
    assert sink.frames[30].state is AvatarState.IDLE
    ended = [e for e in sink.events if isinstance(e, SpeechEnded)]
    assert ended == [SpeechEnded(1, 30, 0, False)]
    assert states(sink) == [("idle", "speaking"), ("speaking", "idle")]
    # SPEECH_ENDED comes after the utterance's last frame: events are emitted in tick order
    assert s.stats.speech_frames == 30 and s.stats.underruns == 0
    await s.close()


async def test_a_quiet_client_ends_the_utterance_after_the_gap(session):
    s, sink, clock = session
    s.push_audio(wav("short_16k.wav")[:640 * 5])  # no end: 4 frames ready (1 of look-ahead)
    assert await render_ready(s) == 4
    tick(s, clock, 0, 7)  # 0.28 s after the audio: still open
    assert s.stream.ready_frames() == 0 and s.speech.last_audio
    clock.t += 0.01
    tick(s, clock, 7, 1)  # 0.33 s: past SPEECH_GAP_MS, the one rule ends it
    assert s.speech.last_audio == 0.0 and await render_ready(s) == 1
    tick(s, clock, 8, 2)
    assert [e for e in sink.events if isinstance(e, SpeechEnded)] == [SpeechEnded(1, 5, 0, False)]
    await s.close()


async def test_underruns_hold_the_picture_and_late_frames_are_dropped(session):
    s, sink, clock = session
    s.push_audio(wav("short_16k.wav")[:640 * 12], end_of_speech=True)
    assert await render_ready(s) == 12
    tick(s, clock, 0, 2)  # frames 0 and 1 shown
    # a stall: the next tick comes 6 periods late; frames overdue by more than 2 are dropped
    clock.t += 0.2
    tick(s, clock, 7, 12)
    speech = [f.utterance_frame for f in sink.frames if f.utterance_frame is not None]
    assert speech[:2] == [0, 1] and speech == sorted(speech) and speech[-1] == 11
    ended = next(e for e in sink.events if isinstance(e, SpeechEnded))
    assert ended.skipped == 12 - len(speech) > 0 and ended.frames == len(speech)
    await s.close()


async def test_back_to_back_utterances_keep_one_schedule_so_lag_cannot_pile_up(session):
    """A client streams utterance after utterance (END_OF_SPEECH, then the next at once). Lag
    within the bound must not turn into queued frames at each boundary: the second utterance
    continues the first one's schedule, so lateness stays within MAX_SPEECH_LAG_FRAMES (2)."""
    s, sink, clock = session
    pcm = wav("short_16k.wav")
    s.push_audio(pcm[:640 * 12], end_of_speech=True)  # nominal ticks 0..11
    s.push_audio(pcm[640 * 12:640 * 24], end_of_speech=True)  # nominal ticks 12..23
    assert await render_ready(s) == 24
    tick(s, clock, 0, 2)
    tick(s, clock, 4, 12)  # a 2-tick stall in the first: late by 2, within the bound
    tick(s, clock, 16, 2)
    tick(s, clock, 20, 10)  # another 2 ticks in the second: 4 behind, 2 must be dropped
    shown = [(f.index, f.utterance_id, f.utterance_frame) for f in sink.frames
             if f.utterance_frame is not None]
    lag = [n - (k if u == 1 else 12 + k) for n, u, k in shown]
    assert max(lag) == 2, lag
    ended = [e for e in sink.events if isinstance(e, SpeechEnded)]
    # the second drops 2 for the bound, and its pauses' silent frames while it is behind
    assert ended[0].frames == 12 and ended[1].frames + ended[1].skipped == 12
    assert ended[1].skipped >= 2 and lag[-1] <= 2
    await s.close()


async def test_a_pause_absorbs_lag_within_the_bound(session):
    """Two ticks behind (within MAX_SPEECH_LAG_FRAMES, so nothing was dropped) and then a
    pause: silent frames are dropped until the video is back on schedule; no voiced frame is."""
    s, sink, clock = session
    speech = wav("short_16k.wav")
    voiced = [k for k in range(6) if np.sqrt(np.mean(speech[640 * k:640 * (k + 1)] ** 2.0)) > 300]
    assert len(voiced) >= 4  # the fixture speaks from its start
    pcm = np.concatenate([speech[:640 * 6], np.zeros(640 * 6, np.int16), speech[:640 * 6]])
    s.push_audio(pcm, end_of_speech=True)
    assert await render_ready(s) == 18
    tick(s, clock, 0, 2)
    tick(s, clock, 4, 30)  # two ticks late from frame 2 on
    shown = [(f.index, f.utterance_frame) for f in sink.frames if f.utterance_frame is not None]
    lag = {k: n - k for n, k in shown}
    assert lag[5] == 2, "voiced frames are not dropped to catch up"
    dropped = sorted(set(range(18)) - set(lag))
    assert dropped == [6, 7], dropped  # the first two silent frames
    assert lag[17] == 0 and all(lag[k] == 0 for k in range(12, 18))
    ended = next(e for e in sink.events if isinstance(e, SpeechEnded))
    assert (ended.frames, ended.skipped) == (16, 2)
    await s.close()


async def live(s: Session, clock: FakeClock, pcm: np.ndarray, ticks: int, first: int = 2,
               render_on: Any = lambda n: True, after_tick: Any = lambda n: None) -> None:
    """``first`` frames of ``pcm`` at once, then one frame's audio a tick, as it is spoken: the
    engine renders what it can on the ticks ``render_on(n)`` says, then the playout ticks."""
    s.push_audio(pcm[:640 * first])
    await render_ready(s)
    for n in range(ticks):
        s.push_audio(pcm[640 * (first + n):640 * (first + n + 1)])
        if render_on(n):
            await render_ready(s)
        tick(s, clock, n, 1)
        after_tick(n)


def _talk_and_pause(speech: np.ndarray, periods: int) -> np.ndarray:
    """10 voiced frames, 10 silent ones, ``periods`` times."""
    voiced = speech[:640 * 10]
    return np.concatenate([np.concatenate([voiced, np.zeros(640 * 10, np.int16)])
                           for _ in range(periods)])


@pytest.mark.parametrize("burst", [13, 60])
async def test_a_standing_backlog_of_a_live_stream_is_trimmed_in_pauses(session, burst):
    """A live client stalled, then sent what it owed at once (13 frames, or 60: more than the
    speech queue holds), then real time again: the backlog would stand for good (0.5 or 2.4 s
    of latency). It is trimmed to ~3 frames in the pauses; no voiced frame is dropped."""
    s, sink, clock = session
    pcm = _talk_and_pause(wav("short_16k.wav"), 16)
    s.push_audio(pcm[:640 * burst])
    await render_ready(s)
    backlog = []
    for n in range(260):  # then 40 ms of audio per tick, as it is spoken
        s.push_audio(pcm[640 * (burst + n):640 * (burst + n + 1)])
        await render_ready(s)
        tick(s, clock, n, 1)
        backlog.append(len(s.queue) + s.stream.buffered_samples() // 640)
    assert min(backlog[:50]) >= burst - 2, "untouched until it has stood for 2 s"
    assert max(backlog[-20:]) <= 5, backlog[-20:]
    shown = {f.utterance_frame for f in sink.frames if f.utterance_frame is not None}
    dropped = set(range(max(shown))) - shown
    assert len(dropped) >= burst - 5 and all((k // 10) % 2 == 1 for k in dropped), sorted(dropped)
    await s.close()


async def test_a_backlog_of_unrendered_audio_never_drops_the_only_queued_frame(session):
    """The standing backlog may be mostly audio the engine has not rendered yet (a slow
    engine): a tick with one frame queued drops nothing and shows it (it used to drop it and
    then fail on the empty queue); only silent frames with another behind them go."""
    s, sink, clock = session
    s.audio_backlog = lambda: 640 * 10  # ten frames' audio waiting behind the queue
    await live(s, clock, _talk_and_pause(wav("short_16k.wav"), 4), 70)
    shown = [f.utterance_frame for f in sink.frames if f.utterance_frame is not None]
    assert shown == sorted(shown) and shown[-1] >= 65
    assert all((k // 10) % 2 == 1 for k in set(range(shown[-1])) - set(shown))
    await s.close()


async def test_the_look_ahead_of_a_stream_on_schedule_is_not_trimmed(session):
    """A stream on schedule holds the engine's look-ahead as audio it cannot render yet (a
    MuseTalk stream: 4 frames). That backlog stands, but it is needed, not latency: no frame
    is trimmed for it (the floor counted only the jitter allowance, and MuseTalk streams lost
    a silent frame in every pause, then ran a tick tight: an underrun for each)."""
    s, sink, clock = session
    s.lookahead_frames = lambda: 6
    s.audio_backlog = lambda: 640 * 6  # the look-ahead's audio, always waiting
    await live(s, clock, _talk_and_pause(wav("short_16k.wav"), 4), 78)
    shown = [f.utterance_frame for f in sink.frames if f.utterance_frame is not None]
    assert shown == list(range(len(shown))) and len(shown) >= 70, shown
    assert s.stats.speech_frames_skipped == 0
    await s.close()


async def test_an_utterance_started_before_the_allowance_was_learned_moves_to_it(session):
    """A cold start: the utterance starts before any latency was measured (no jitter
    allowance); the engine delivers its frames in bursts 3 and 5 ticks apart (a batch cycle
    with its jitter), and the allowance is learned (0.2 s). The few underruns before shift
    the playout later, and it stays there: measured against a schedule that follows the
    allowance it is not behind, so no pause is cut to catch up. (Against the tight start,
    every pause lost silent frames to catch up, and the next burst ran late again: an
    underrun and a dropped frame every few ticks, for good.)"""
    s, sink, clock = session
    allowance = [0.0]
    s.speech_delay = lambda: allowance[0]
    underruns, skipped = [], []

    def after_tick(n: int) -> None:
        if n == 11:
            allowance[0] = 0.2  # learned: from the next tick on
        underruns.append(s.stats.underruns)
        skipped.append(s.stats.speech_frames_skipped)

    # the engine's batch cycle: 3 or 5 frames at a time
    await live(s, clock, _talk_and_pause(wav("short_16k.wav"), 8), 150,
               render_on=lambda n: n % 8 in (2, 7), after_tick=after_tick)
    assert underruns[12] > 0, "the tight schedule ran late"
    assert underruns[-1] == underruns[40], underruns  # none once the playout has moved
    assert skipped[-1] == skipped[40], skipped
    shown = [f.utterance_frame for f in sink.frames if f.utterance_frame is not None]
    assert shown == sorted(shown) and len(shown) >= 130
    await s.close()


async def test_a_burst_that_plays_out_is_not_trimmed(session):
    """Audio faster than real time (TTS) drains the queue: every frame is shown."""
    s, sink, clock = session
    pcm = _talk_and_pause(wav("short_16k.wav"), 2)  # 40 frames at once, no END_OF_SPEECH
    s.push_audio(pcm)
    await render_ready(s)
    tick(s, clock, 0, 45)
    shown = [f.utterance_frame for f in sink.frames if f.utterance_frame is not None]
    assert shown == list(range(len(shown))) and len(shown) >= 39
    await s.close()


async def test_interrupt_drops_queued_speech_and_reports_it(session):
    s, sink, clock = session
    s.push_audio(wav("short_16k.wav"), end_of_speech=True)
    await render_ready(s)
    tick(s, clock, 0, 5)
    s.interrupt()
    tick(s, clock, 5, 2)
    assert len(s.queue) == 0 and s.queue.drawn == 0
    assert [e for e in sink.events if isinstance(e, SpeechEnded)] == [SpeechEnded(1, 5, 0, True)]
    assert sink.frames[-1].state is AvatarState.IDLE
    await s.close()


async def test_state_change_to_speaking_waits_for_audio_two_seconds(session):
    s, sink, clock = session
    s.change_state(AvatarState.SPEAKING, "speaking")
    assert states(sink) == [("idle", "speaking")]
    assert sink.events[0].clip == "speaking"
    tick(s, clock, 0, 40)  # 1.6 s: speaking frames on the speaking clip, mouth closed
    assert {(f.state, f.clip) for f in sink.frames} == {(AvatarState.SPEAKING, "speaking")}
    tick(s, clock, 40, 20)  # past 2 s without audio: back to idle
    assert sink.frames[-1].state is AvatarState.IDLE and sink.frames[-1].clip == "idle"
    assert states(sink) == [("idle", "speaking"), ("speaking", "idle")]
    await s.close()


async def test_requests_for_the_current_state_confirm_and_illegal_ones_raise(session):
    s, sink, _ = session
    s.change_state(AvatarState.IDLE, "listening")
    assert sink.events == [StateChanged(AvatarState.IDLE, AvatarState.IDLE, "listening")]
    with pytest.raises(InvalidStateTransition):
        s.change_state(AvatarState.ACTION)
    await s.close()


async def test_an_action_plays_through_and_returns(session):
    s, sink, clock = session
    trig = s.start_action("action_1", legacy=True)
    assert (trig.clip, trig.frames) == ("nod", 25)
    tick(s, clock, 0, 27)
    acts = [f for f in sink.frames if f.state is AvatarState.ACTION]
    assert len(acts) == 25 and all(f.legacy_action and f.action == "nod" for f in acts)
    assert [round(f.progress, 2) for f in acts] == [round((i + 1) / 25, 2) for i in range(25)]
    assert states(sink) == [("idle", "action"), ("action", "idle")]
    await s.close()


async def test_a_render_failure_is_reported_and_costs_the_utterance(session):
    s, sink, _ = session
    s.push_audio(wav("short_16k.wav"))
    s._render_failed(ProcessingError("rendering failed; speech dropped"))
    assert isinstance(sink.events[-1], ServiceError) and sink.events[-1].code == "PROCESSING_ERROR"
    assert s.stream.buffered_samples() == 0 and s.stats.interrupts == 1
    await s.close()


async def test_a_bridge_shows_pushed_frames_on_the_session_clock(session):
    from websocket_service.errors import InvalidMessage

    s, sink, clock = session
    bridge = s.open_bridge()
    frames = [np.full((512, 512, 3), 10 * k, np.uint8) for k in range(5)]
    for k, img in enumerate(frames):  # pushed ahead of time: each shows when its time comes
        bridge.push_frame(img, 40.0 * k, clock.now())
    bridge.push_audio(np.arange(1000, dtype=np.int16), 0.0, clock.now())
    with pytest.raises(InvalidMessage, match="goes back"):
        bridge.push_frame(frames[0], 10.0, clock.now())
    with pytest.raises(InvalidMessage):
        bridge.push_frame(np.zeros((10, 10, 3), np.uint8), 500.0, clock.now())
    for n in range(6):
        s.playout.tick(n)  # tick n at pusher time 40 n ms
        clock.t += 0.04
    shown = [int(f.image[0, 0, 0]) for f in sink.frames]
    assert shown == [0, 10, 20, 30, 40, 40]  # the last one held
    assert np.array_equal(np.concatenate([f.pcm for f in sink.frames[:2]])[:1000],
                          np.arange(1000, dtype=np.int16))
    assert {f.clip for f in sink.frames} == {"bridge"}
    assert sink.frames[0].state is AvatarState.SPEAKING  # audio is playing
    s.close_bridge(bridge)
    s.playout.tick(6)
    assert sink.frames[-1].clip == "idle"  # back to the avatar's own loop
    await s.close()


async def test_an_engine_with_a_jitter_allowance_starts_the_utterance_that_late(session):
    """A batching engine (MuseTalk) delivers frames in bursts; its ``speech_delay`` holds an
    utterance's start until its first frame's audio is that old, so that later frames keep
    their slots. The rest of the schedule is unchanged: one frame a tick, no underrun."""
    s, sink, clock = session
    s.speech_delay = lambda: 0.1  # the stream says: 100 ms after the audio arrived
    s.push_audio(wav("short_16k.wav"), end_of_speech=True)
    arrival = clock.t
    assert await render_ready(s) == 30
    tick(s, clock, 0, 36)
    first = next(f for f in sink.frames if f.utterance_id is not None)
    # ticks at +40, +80, +120 ms: the first at or after arrival + 100 ms is the third
    assert first.index == 2 and clock.t - arrival >= 0.1
    speech = [f for f in sink.frames if f.utterance_id is not None]
    assert [f.utterance_frame for f in speech] == list(range(30))
    assert [f.index for f in speech] == list(range(2, 32))
    assert s.stats.underruns == 0
    await s.close()


# --- ticks lined up with speech (ALIGN_TICKS_TO_SPEECH) ----------------------------------------

def paced(s: Session, clock: FakeClock, pacer: Pacer, count: int) -> None:
    """``count`` ticks on ``pacer``'s deadlines, the clock at each, as the playout's task runs
    them (the pacer's deadlines move when the schedule lines the ticks up)."""
    for _ in range(count):
        n = pacer.n
        clock.t = pacer.due(n)
        pacer.n += 1
        s.playout.tick(n)


def lined_up(s: Session, clock: FakeClock) -> Pacer:
    pacer = Pacer(clock, 25, t0=clock.t)
    s.playout.speech.grid = pacer
    return pacer


@pytest.mark.parametrize("allowance", [0.07, 0.1, 0.115])
async def test_lined_up_ticks_start_an_utterance_exactly_when_its_allowance_has_passed(
        session, allowance):
    """Against test_an_engine_with_a_jitter_allowance_starts_the_utterance_that_late: the
    first frame goes out right at arrival + allowance (not on the first tick after it), the
    rest one period apart, numbered without a gap."""
    s, sink, clock = session
    pacer = lined_up(s, clock)
    s.speech_delay = lambda: allowance
    s.push_audio(wav("short_16k.wav"), end_of_speech=True)
    arrival = clock.t
    assert await render_ready(s) == 30
    paced(s, clock, pacer, 36)
    speech = [f for f in sink.frames if f.utterance_id is not None]
    assert [f.utterance_frame for f in speech] == list(range(30))
    assert [f.created - arrival for f in speech] == pytest.approx(
        [allowance + 0.04 * k for k in range(30)])
    assert [f.index for f in sink.frames] == list(range(36))
    assert [f.timestamp_ms for f in sink.frames] == [40 * n for n in range(36)]
    assert s.stats.underruns == 0
    await s.close()


async def test_lined_up_ticks_follow_the_allowance_by_more_than_10ms(session):
    s, sink, clock = session
    pacer = lined_up(s, clock)
    allowance = [0.1]
    s.speech_delay = lambda: allowance[0]
    s.push_audio(wav("short_16k.wav"), end_of_speech=True)
    arrival = clock.t
    assert await render_ready(s) == 30
    paced(s, clock, pacer, 10)  # frames 0-6 out, each 100 ms after its slot
    allowance[0] = 0.115  # +15 ms: frames from the next on go out 15 ms later
    paced(s, clock, pacer, 5)
    allowance[0] = 0.12  # +5 ms more: within 10 ms of the schedule, which stays
    paced(s, clock, pacer, 5)
    allowance[0] = 0.09  # -25 ms against the schedule: earlier again
    paced(s, clock, pacer, 10)
    after_slot = [round((f.created - arrival - 0.04 * f.utterance_frame) * 1000, 3)
                  for f in sink.frames if f.utterance_frame is not None]
    # (the tick that reads a new allowance still shows its frame on the old schedule)
    assert after_slot == [100.0] * 8 + [115.0] * 10 + [90.0] * 9
    assert s.stats.underruns == 0 and s.stats.speech_frames_skipped == 0
    await s.close()


async def test_a_playout_lined_up_with_speech_says_where_it_ticks_now():
    """The playout's task: when its ticks moved, /sessions' tick_phase_ms and the phase
    spreader's count follow them."""
    clock = GatedClock()
    phases = PhaseSpreader(25, slots=8)
    video = VideoSettings(width=512, height=512, bitrate=1_000_000, gop_frames=25, fps=25)
    s = Session("s1", "u1", builtin(), engine(), Settings(), video, "idle", clock=clock,
                phases=phases)
    s.start()
    await clock.sleeps(1)
    before = s.stats.snapshot(clock.t)["tick_phase_ms"]
    slot = phases.used().index(1)
    grid = s.playout.speech.grid
    assert grid is not None
    grid.shift(0.012)  # as lining up with an utterance does
    clock.gate.set()  # one tick: the parked sleep returns, the next one parks
    clock.gate.clear()
    await clock.sleeps(2)
    assert clock.deadlines[1] - clock.deadlines[0] == pytest.approx(0.052)
    after = s.stats.snapshot(clock.t)["tick_phase_ms"]
    assert after == pytest.approx((before + 12) % 40, abs=0.1)
    assert phases.used()[(slot + 2) % 8] == 1 and sum(phases.used()) == 1
    await s.close()
    assert phases.used() == [0] * 8


async def test_no_lining_up_when_it_is_off():
    clock = GatedClock()
    video = VideoSettings(width=512, height=512, bitrate=1_000_000, gop_frames=25, fps=25)
    s = Session("s1", "u1", builtin(), engine(), Settings(align_ticks_to_speech=False), video,
                "idle", clock=clock)
    s.start()
    await clock.sleeps(1)
    assert s.playout.speech.grid is None
    await s.close()


class GatedClock(FakeClock):
    """A pacer's (or the grace's) sleep records its deadline and says so (``parked``), then
    lasts until the test opens the gate (never, unless it does): then the clock is at that
    deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.deadlines: list[float] = []
        self.parked = asyncio.Event()
        self.gate = asyncio.Event()

    async def sleep_until(self, deadline: float) -> None:
        self.deadlines.append(deadline)
        self.parked.set()
        await self.gate.wait()
        self.t = max(self.t, deadline)

    async def sleeps(self, count: int) -> None:
        """Until ``count`` sleeps have begun in all."""
        while len(self.deadlines) < count:
            self.parked.clear()
            await self.parked.wait()


async def test_sessions_opened_together_tick_on_different_phases_and_give_them_back():
    clock = GatedClock()
    phases = PhaseSpreader(25, slots=8)
    video = VideoSettings(width=512, height=512, bitrate=1_000_000, gop_frames=25, fps=25)
    sessions = [Session(f"s{i}", "u1", builtin(), engine(), Settings(), video, "idle",
                        clock=clock, phases=phases) for i in range(3)]
    for s in sessions:
        s.start()
    await clock.sleeps(3)
    assert phases.used().count(1) == 3
    first = sorted(clock.deadlines)
    assert first[0] >= clock.t and first[-1] < clock.t + 0.04
    assert [round(b - a, 6) for a, b in zip(first, first[1:], strict=False)] == [0.005, 0.005]
    # /sessions says where each ticks: 5 ms apart, in the order of their first ticks
    shown = [s.stats.snapshot(clock.t)["tick_phase_ms"] for s in sessions]
    assert [round(b - a, 1) % 40 for a, b in zip(shown, shown[1:], strict=False)] == [5.0, 5.0]
    for s in sessions:
        await s.close()
    assert phases.used() == [0] * 8  # a closed session's phase is free again


# --- the grace before an underrun (SPEECH_GRACE_MS) -------------------------------------------

def gated_session(grace_ms: int) -> tuple[Session, Sink, GatedClock]:
    clock = GatedClock()
    settings = Settings(max_speech_lag_frames=2, speech_gap_ms=300, speech_grace_ms=grace_ms)
    video = VideoSettings(width=512, height=512, bitrate=1_000_000, gop_frames=25, fps=25)
    s = Session("s1", "u1", builtin(), engine(), settings, video, "idle", clock=clock)
    sink = Sink()
    s.add_sink(sink)
    return s, sink, clock


async def started_waiting(task: asyncio.Task, clock: GatedClock) -> None:
    """Let ``task`` run until it sleeps on the clock (or ends: then the test fails)."""
    for _ in range(1000):
        if clock.deadlines or task.done():
            break
        await asyncio.sleep(0)
    assert clock.deadlines and not task.done()


async def mid_utterance(s: Session, clock: GatedClock, pcm: np.ndarray) -> int:
    """Play the first 10 frames' audio (no end): 9 frames shown (the 10th waits for its
    look-ahead), the queue empty, the utterance in play. The next tick's number."""
    s.push_audio(pcm[:640 * 10])
    assert await render_ready(s) == 9
    tick(s, clock, 0, 9)
    assert len(s.queue) == 0 and s.stats.speech_frames == 9
    return 9


async def test_a_frame_rendered_within_the_grace_goes_out_on_its_tick_not_an_underrun():
    s, sink, clock = gated_session(15)
    pcm = wav("short_16k.wav")
    n = await mid_utterance(s, clock, pcm)
    due = clock.t + 0.04
    waiting = asyncio.create_task(s.playout.grace(due))
    await started_waiting(waiting, clock)  # for a frame, or until due + 15 ms
    assert clock.deadlines == [pytest.approx(due + 0.015)] and not waiting.done()
    s.push_audio(pcm[640 * 10: 640 * 12])  # the audio comes, the frame renders
    assert await render_ready(s) == 2
    await asyncio.wait_for(waiting, 5)  # done on the frame's arrival, the gate still shut
    assert not clock.gate.is_set()
    clock.t = due + 0.005
    s.playout.tick(n)
    shown = sink.frames[-1]
    assert shown.utterance_frame == 9 and shown.index == n and shown.timestamp_ms == 40 * n
    assert s.stats.underruns == 0 and s.stats.speech_frames_waited == 1
    await s.close()


async def test_past_the_grace_the_last_picture_is_held():
    s, sink, clock = gated_session(15)
    n = await mid_utterance(s, clock, wav("short_16k.wav"))
    due = clock.t + 0.04
    waiting = asyncio.create_task(s.playout.grace(due))
    await started_waiting(waiting, clock)
    clock.gate.set()  # 15 ms pass and no frame came
    await asyncio.wait_for(waiting, 5)
    assert clock.t == pytest.approx(due + 0.015)
    s.playout.tick(n)
    held = sink.frames[-1]
    assert held.utterance_id is None and np.array_equal(held.image, sink.frames[-2].image)
    assert s.stats.underruns == 1 and s.stats.speech_frames_waited == 0
    await s.close()


@pytest.mark.parametrize("case", ["idle", "frame queued", "grace 0"])
async def test_no_grace_wait_outside_an_underrun(case):
    s, _, clock = gated_session(0 if case == "grace 0" else 15)
    if case != "idle":
        pcm = wav("short_16k.wav")
        await mid_utterance(s, clock, pcm)
        if case == "frame queued":
            s.push_audio(pcm[640 * 10: 640 * 12])
            assert await render_ready(s) == 2
    await asyncio.wait_for(s.playout.grace(clock.t + 0.04), 5)  # returns at once
    assert clock.deadlines == []
    await s.close()
