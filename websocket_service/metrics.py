"""Process-wide metrics for ``GET /metrics``, exposed with ``prometheus-client``.

Counters add up the counters of closed sessions and those of the live ones (collected at
scrape time), so they only grow; the speech latency histogram (audio chunk in -> its frame
sent) has fixed buckets, so its memory is constant whatever the traffic. The process
collector adds the server's memory, CPU time and open file descriptors
(``process_resident_memory_bytes``, ...). Each :class:`ServiceMetrics` has its own registry,
so several apps in one process (tests) do not share counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
    "speech_frames_waited": ("avatar_speech_frames_waited_total",
                             "Speech frames sent up to SPEECH_GRACE_MS after their tick."),
    "audio_samples": ("avatar_audio_samples_total", "Audio samples (16 kHz) received."),
    "errors_sent": ("avatar_errors_sent_total", "ERROR messages sent to clients."),
    "render_errors": ("avatar_render_errors_total", "Engine failures while rendering speech."),
    "bytes_sent": ("avatar_bytes_sent_total", "Bytes of frame messages sent."),
}


class _SessionCollector(Collector):
    """What is read from the sessions at scrape time (see :meth:`ServiceMetrics.render`)."""

    def __init__(self, owner: ServiceMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        live, max_sessions, engine = self.owner._scrape
        yield GaugeMetricFamily("avatar_sessions", "Sessions open now.", value=len(live))
        yield GaugeMetricFamily("avatar_sessions_max", "The MAX_SESSIONS limit.",
                                value=max_sessions)
        for key, (name, help_) in SESSION_COUNTERS.items():
            total = self.owner.closed[key] + sum(getattr(s, key) for s in live)
            yield CounterMetricFamily(name, help_, value=total)
        yield from _per_session(self.owner._sessions)
        rtf = engine.get("realtime_factor")
        if isinstance(rtf, int | float):
            g = GaugeMetricFamily("avatar_engine_realtime_factor",
                                  "Engine compute seconds per second of 25 fps video "
                                  "(above 1: cannot keep up).", labels=["engine"])
            g.add_metric([str(engine.get("name"))], rtf)
            yield g


def _per_session(sessions: dict[str, SessionStats]) -> Iterator[Metric]:
    """Gauges per live session and per reader of it (owner "0", viewers "1", "2", ...)."""
    fam = {k: GaugeMetricFamily(f"avatar_session_{k}", h, labels=["session"]) for k, h in (
        ("fps", "Frames per second the session emits."),
        ("frames_dropped", "Frames the session dropped for slow readers."),
        ("latency_p50_seconds", "Audio chunk in -> its frame sent, median of the last samples."),
        ("kbit_s", "Frame data sent per second, all readers."),
        ("viewers", "Receive-only connections."))}
    rd = {k: GaugeMetricFamily(f"avatar_reader_{k}", h, labels=["session", "reader"]) for k, h in (
        ("fps", "Frames per second this connection received."),
        ("frames_dropped", "Frames dropped for this connection (slow reader)."),
        ("kbit_s", "Frame data sent per second to this connection."),
        ("latency_seconds", "Frame made -> sent to this connection, median of the last 100."))}
    for sid, st in sessions.items():
        up = max(st._emit_times[-1] - st.started, 1e-3) if st._emit_times else 1e-3
        p50 = st.latency_ms().get("p50")
        for k, v in (("fps", st.fps() or 0.0), ("frames_dropped", st.frames_dropped),
                     ("latency_p50_seconds", (p50 or 0.0) / 1000.0),
                     ("kbit_s", st.bytes_sent * 8 / 1000 / up), ("viewers", st.viewers)):
            fam[k].add_metric([sid], float(v))
        for i, r in enumerate(st.readers() if st.readers is not None else []):
            for k in ("fps", "kbit_s"):
                rd[k].add_metric([sid, str(i)], float(r[k]))
            rd["frames_dropped"].add_metric([sid, str(i)], float(r["dropped"]))
            rd["latency_seconds"].add_metric([sid, str(i)], (r["latency_ms"] or 0.0) / 1000.0)
    yield from fam.values()
    yield from rd.values()


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.closed: Counter[str] = Counter()
        self.sessions_opened = PromCounter("avatar_sessions_opened", "Sessions opened.",
                                           registry=self.registry)
        self.messages_rate_limited = PromCounter(
            "avatar_messages_rate_limited", "Client messages dropped by the message rate limit.",
            registry=self.registry)
        self.latency = Histogram("avatar_speech_latency_seconds",
                                 "Audio chunk arrival to its lip-synced frame sent.",
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        ProcessCollector(registry=self.registry)
        self._scrape: tuple[list[SessionStats], int, dict[str, Any]] = ([], 0, {})
        self._sessions: dict[str, SessionStats] = {}
        self.registry.register(_SessionCollector(self))

    def session_opened(self, stats: SessionStats) -> None:
        self.sessions_opened.inc()
        stats.latency_hist = self.latency

    def session_closed(self, stats: SessionStats) -> None:
        for key in SESSION_COUNTERS:
            self.closed[key] += getattr(stats, key)

    def message_rate_limited(self) -> None:
        self.messages_rate_limited.inc()

    def render(self, live: Iterable[SessionStats], max_sessions: int,
               engine: dict[str, Any], by_id: dict[str, SessionStats] | None = None) -> str:
        """The Prometheus text exposition, with the live sessions' counters added in, and
        gauges per session and reader for the sessions in ``by_id``."""
        self._scrape = (list(live), max_sessions, engine)
        self._sessions = by_id or {}
        try:
            return generate_latest(self.registry).decode()
        finally:
            self._scrape, self._sessions = ([], 0, {}), {}
