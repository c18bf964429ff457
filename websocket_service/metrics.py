"""Process-wide metrics in the Prometheus text format (``GET /metrics``).

Counters add up the counters of closed sessions and those of the live ones, so they only
grow; the speech latency histogram (audio chunk in -> its frame sent) has fixed buckets, so
its memory is constant whatever the traffic.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .stats import SessionStats

LATENCY_BUCKETS_S = (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)

#: SessionStats counter -> (metric name, help)
SESSION_COUNTERS = {
    "frames_sent": ("avatar_frames_sent_total", "Video frames sent to clients."),
    "frames_dropped": ("avatar_frames_dropped_total", "Frames dropped for slow readers."),
    "skipped_frames": ("avatar_frames_skipped_total", "Frames skipped by a pacer that fell behind."),
    "speech_frames": ("avatar_speech_frames_total", "Lip-synced frames shown."),
    "speech_frames_skipped": ("avatar_speech_frames_skipped_total",
                              "Speech frames dropped as overdue after stalls."),
    "underruns": ("avatar_speech_underruns_total", "Ticks where a speech frame was not ready."),
    "audio_samples": ("avatar_audio_samples_total", "Audio samples (16 kHz) received."),
    "errors_sent": ("avatar_errors_sent_total", "ERROR messages sent to clients."),
    "render_errors": ("avatar_render_errors_total", "Engine failures while rendering speech."),
    "bytes_sent": ("avatar_bytes_sent_total", "Bytes of frame messages sent."),
}


class Histogram:
    """A cumulative-bucket histogram of seconds."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cum += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {cum}"]
        return out


class ServiceMetrics:
    def __init__(self) -> None:
        self.closed: Counter[str] = Counter()
        self.sessions_opened = 0
        self.messages_rate_limited = 0
        self.latency = Histogram()

    def message_rate_limited(self) -> None:
        self.messages_rate_limited += 1

    def session_opened(self, stats: SessionStats) -> None:
        self.sessions_opened += 1
        stats.latency_hist = self.latency

    def session_closed(self, stats: SessionStats) -> None:
        for key in SESSION_COUNTERS:
            self.closed[key] += getattr(stats, key)

    def render(self, live: Iterable[SessionStats], max_sessions: int,
               engine: dict[str, Any]) -> str:
        live = list(live)
        lines = [
            "# HELP avatar_sessions Sessions open now.", "# TYPE avatar_sessions gauge",
            f"avatar_sessions {len(live)}",
            "# HELP avatar_sessions_max The MAX_SESSIONS limit.", "# TYPE avatar_sessions_max gauge",
            f"avatar_sessions_max {max_sessions}",
            "# HELP avatar_sessions_opened_total Sessions opened.",
            "# TYPE avatar_sessions_opened_total counter",
            f"avatar_sessions_opened_total {self.sessions_opened}",
            "# HELP avatar_messages_rate_limited_total Client messages dropped by the message "
            "rate limit.", "# TYPE avatar_messages_rate_limited_total counter",
            f"avatar_messages_rate_limited_total {self.messages_rate_limited}",
        ]
        for key, (name, help_) in SESSION_COUNTERS.items():
            total = self.closed[key] + sum(getattr(s, key) for s in live)
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {total}"]
        name = "avatar_speech_latency_seconds"
        lines += [f"# HELP {name} Audio chunk arrival to its lip-synced frame sent.",
                  f"# TYPE {name} histogram", *self.latency.lines(name)]
        rtf = engine.get("realtime_factor")
        if isinstance(rtf, int | float):
            lines += ["# HELP avatar_engine_realtime_factor Engine compute seconds per second "
                      "of 25 fps video (above 1: cannot keep up).",
                      "# TYPE avatar_engine_realtime_factor gauge",
                      f'avatar_engine_realtime_factor{{engine="{engine.get("name")}"}} {rtf}']
        return "\n".join(lines) + "\n"
