"""Per-session counters and bounded latency samples for /sessions and benchmarks."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .units import SAMPLE_RATE

LATENCY_SAMPLES = 500
FPS_WINDOW = 50


def percentile(values: list[float] | deque[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 2)


@dataclass
class SessionStats:
    started: float
    frames_emitted: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0  # dropped by a sink for a slow reader
    skipped_frames: int = 0  # pacer fell behind and skipped ahead
    speech_frames: int = 0
    underruns: int = 0
    speech_frames_waited: int = 0  # shown after a wait of up to SPEECH_GRACE_MS past its tick
    speech_frames_skipped: int = 0
    audio_samples: int = 0
    audio_rejected_chunks: int = 0
    duration_mismatches: int = 0  # chunks whose duration_ms disagreed with their bytes
    interrupts: int = 0
    actions: int = 0
    state_changes: int = 0
    render_errors: int = 0
    errors_sent: int = 0
    bytes_sent: int = 0
    loop_frames: int = 0  # frames sent from a shared pre-encoded loop (no encode)
    live_frames: int = 0  # frames encoded for this session alone (speech, actions, idle)
    loop_waits: int = 0  # idle frames not sent: their shared loop was being built
    batched_frames: int = 0  # frames encoded behind another in one call (a feed catching up)
    #: where in the frame period this session ticks, on its server's clock (sessions of one
    #: server with different phases tick at different moments; pacing.PhaseSpreader)
    tick_phase_ms: float | None = None
    viewers: int = 0  # receive-only WebSocket connections on this session
    #: per WebSocket connection (owner first, then viewers): frames sent, dropped, bytes
    readers: Callable[[], list[dict[str, Any]]] | None = None
    rendered_frames: int = 0
    render_busy_s: float = 0.0
    _emit_times: deque[float] = field(default_factory=lambda: deque(maxlen=FPS_WINDOW))
    _latency: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    _pipeline: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    rtc: dict[str, Any] = field(default_factory=dict)
    latency_hist: Any = None  # the process-wide metrics.Histogram, when attached

    # What happened, told by the part that saw it: the counters are written only here.
    def frames_skipped(self, n: int) -> None:
        """The pacer woke ``n`` frames late and skipped them."""
        self.skipped_frames += n

    def speech_frame_shown(self) -> None:
        self.speech_frames += 1

    def speech_frame_dropped(self) -> None:
        """A speech frame too late for its slot was dropped (or trimmed in a pause)."""
        self.speech_frames_skipped += 1

    def speech_frame_waited(self) -> None:
        """A tick waited (up to SPEECH_GRACE_MS) for its speech frame, which then went out."""
        self.speech_frames_waited += 1

    def underrun(self) -> None:
        """An utterance's next frame was not rendered in time: its last picture was held."""
        self.underruns += 1

    def audio_received(self, samples: int) -> None:
        self.audio_samples += samples

    def audio_rejected(self) -> None:
        """A chunk refused because too much audio waits to be rendered."""
        self.audio_rejected_chunks += 1

    def duration_mismatch(self) -> None:
        """A chunk's ``duration_ms`` disagreed with its bytes (the bytes were used)."""
        self.duration_mismatches += 1

    def interrupted(self) -> None:
        self.interrupts += 1

    def action_started(self) -> None:
        self.actions += 1

    def state_changed(self) -> None:
        self.state_changes += 1

    def render_failed(self) -> None:
        self.render_errors += 1

    def error_sent(self) -> None:
        """An ERROR went out to the session's owner."""
        self.errors_sent += 1

    def rtc_state(self, state: str) -> None:
        """The owner's WebRTC connection state (``rtc.connection_state``)."""
        self.rtc["connection_state"] = state

    def rtc_failed(self, code: str, message: str) -> None:
        """The owner's WebRTC connection failed (``rtc.error``)."""
        self.rtc["error"] = {"code": code, "message": message}

    def rtc_report(self, summary: dict[str, Any], mic_pushed_s: float | None = None) -> None:
        """The peer connection's latest ``getStats()`` summary, and the microphone audio
        pushed into the session so far (seconds) when there is a microphone."""
        self.rtc.update(summary)
        if mic_pushed_s is not None:
            self.rtc["mic_pushed_s"] = mic_pushed_s

    def rtc_viewers(self, n: int) -> None:
        """How many WebRTC viewers watch the session (``rtc.viewers``)."""
        self.rtc["viewers"] = n

    # Told by the session's feed (websocket_service/feed.py) and its readers' queues.
    def feed_opened(self, readers: Callable[[], list[dict[str, Any]]]) -> None:
        """The session's feed opened: ``readers`` describes its readers (``readers``)."""
        self.readers = readers

    def feed_closed(self) -> None:
        self.readers = None

    def readers_changed(self, count: int) -> None:
        """``count`` readers now take the feed: the first is the owner's, the others viewers."""
        self.viewers = max(0, count - 1)

    def frames_dropped_by_reader(self, n: int = 1) -> None:
        """A reader too slow for the stream lost ``n`` frames (its outbox or WebRTC track)."""
        self.frames_dropped += n

    def frames_dropped_before_encoding(self, n: int = 1) -> None:
        """The feed's encoding fell behind: its ``n`` oldest raw frames were dropped."""
        self.frames_dropped += n

    def loop_frame_copied(self) -> None:
        """A frame was sent from a shared pre-encoded loop (no encode)."""
        self.loop_frames += 1

    def loop_frame_withheld(self) -> None:
        """An idle frame was not sent: its shared loop was being built."""
        self.loop_waits += 1

    def frames_encoded_live(self, n: int) -> None:
        """One live encode took ``n`` frames (those behind the first rode along: batched)."""
        self.live_frames += n
        self.batched_frames += n - 1

    def frame_emitted(self, now: float) -> None:
        self.frames_emitted += 1
        self._emit_times.append(now)

    def frame_sent(self, audio_arrival: float | None, created: float, now: float,
                   nbytes: int = 0) -> None:
        self.frames_sent += 1
        self.bytes_sent += nbytes
        self._pipeline.append(now - created)
        if audio_arrival is not None:
            self._latency.append(now - audio_arrival)
            if self.latency_hist is not None:
                self.latency_hist.observe(now - audio_arrival)

    def render_done(self, frames: int, busy_s: float) -> None:
        self.rendered_frames += frames
        self.render_busy_s += busy_s

    def realtime_factor(self) -> float | None:
        """Seconds of rendering per second of speech video: above 1.0 speech cannot keep up."""
        if not self.rendered_frames:
            return None
        return round(self.render_busy_s / (self.rendered_frames * 0.040), 3)

    def fps(self) -> float | None:
        t = self._emit_times
        if len(t) < 2 or t[-1] <= t[0]:
            return None
        return (len(t) - 1) / (t[-1] - t[0])

    def latency_ms(self) -> dict[str, float | None]:
        return {"p50": _ms(percentile(self._latency, 50)), "p95": _ms(percentile(self._latency, 95)),
                "samples": len(self._latency)}

    def snapshot(self, now: float) -> dict[str, Any]:
        fps = self.fps()
        return {
            "uptime_s": round(now - self.started, 3),
            "frames_emitted": self.frames_emitted,
            "frames_sent": self.frames_sent,
            "fps": None if fps is None else round(fps, 2),
            "dropped_frames": self.frames_dropped,
            "skipped_frames": self.skipped_frames,
            "speech_frames": self.speech_frames,
            "underruns": self.underruns,
            "speech_frames_waited": self.speech_frames_waited,
            "speech_frames_skipped": self.speech_frames_skipped,
            "audio_seconds_received": round(self.audio_samples / SAMPLE_RATE, 3),
            "audio_chunks_rejected": self.audio_rejected_chunks,
            "duration_mismatches": self.duration_mismatches,
            "interrupts": self.interrupts,
            "actions": self.actions,
            "render_errors": self.render_errors,
            "errors_sent": self.errors_sent,
            "bytes_sent": self.bytes_sent,
            "loop_frames": self.loop_frames,
            "live_frames": self.live_frames,
            "loop_waits": self.loop_waits,
            "batched_frames": self.batched_frames,
            "tick_phase_ms": self.tick_phase_ms,
            "viewers": self.viewers,
            "readers": self.readers() if self.readers is not None else [],
            "latency_ms": self.latency_ms(),
            "realtime_factor": self.realtime_factor(),
            "send_pipeline_ms": {"p50": _ms(percentile(self._pipeline, 50)),
                                 "p95": _ms(percentile(self._pipeline, 95))},
            **({"rtc": self.rtc} if self.rtc else {}),
        }
