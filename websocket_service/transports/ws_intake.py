"""What a WebSocket client's frames may become: the rate and size limits, then message models.

:class:`Intake` admits at most ``max_messages_per_s`` messages a second (a token bucket with
``message_burst``; those over it are dropped and reported at most once a second, with a
count), each at most ``max_message_bytes``, and parses a text frame into the protocol's
union (:data:`~websocket_service.protocol.CLIENT_ADAPTER`) and a binary frame into
:class:`AudioBytes`. :class:`~.websocket.Connection` hands the models to its dispatch table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..clock import Clock
from ..config import Settings
from ..errors import InvalidMessage, RateLimitExceeded
from ..limits import DropReport, TokenBucket
from ..metrics import ServiceMetrics
from ..protocol import CLIENT_ADAPTER
from ..wire import explain_invalid


@dataclass(frozen=True)
class AudioBytes:
    """A binary frame: raw 16 kHz mono s16le audio for the session (no JSON envelope)."""

    data: bytes
    type: str = "binary audio"
    session_id: None = None


class Intake:
    """What a connection lets in: at most ``max_messages_per_s`` messages a second (a token
    bucket with ``message_burst``; those over it are dropped, and reported at most once a
    second with a count), each at most ``max_message_bytes``, parsed into message models."""

    def __init__(self, settings: Settings, clock: Clock, metrics: ServiceMetrics) -> None:
        self.settings, self.clock, self.metrics = settings, clock, metrics
        self._bucket = TokenBucket(settings.max_messages_per_s, settings.message_burst,
                                   clock.now())
        self._drops = DropReport()

    def parse(self, message: Mapping[str, Any]) -> Any:
        """The model of a received frame (:class:`AudioBytes` for a binary one); None: it
        was over the rate and dropped (counted into the next report). Raises the report
        (RATE_LIMIT_EXCEEDED) when one fell due, INVALID_MESSAGE for a frame too large or
        not a valid message."""
        now = self.clock.now()
        if not self._bucket.take(now):
            self.metrics.message_rate_limited()
            dropped = self._drops.drop(now)
            if dropped:
                raise self._rate_limited(dropped)
            return None
        text, data = message.get("text"), message.get("bytes")
        if data is not None:
            size = len(data)
        else:
            size = len(text.encode("utf-8")) if text is not None else 0
        limit = self.settings.max_message_bytes
        if size > limit:
            raise InvalidMessage(f"message of {size} bytes exceeds the limit of {limit} bytes",
                                 {"max_message_bytes": limit})
        if data is not None:
            return AudioBytes(data)
        try:
            return CLIENT_ADAPTER.validate_json(text or "")
        except ValidationError as exc:
            raise explain_invalid(text or "", exc) from None

    def report_due_at(self) -> float | None:
        """When the report of messages dropped over the rate is due (None: none dropped)."""
        return self._drops.due_at()

    def drop_report(self) -> RateLimitExceeded | None:
        """The report of the messages dropped over the rate, when it is due now."""
        dropped = self._drops.take(self.clock.now())
        return self._rate_limited(dropped) if dropped else None

    def _rate_limited(self, dropped: int) -> RateLimitExceeded:
        return RateLimitExceeded(
            f"more than {self.settings.max_messages_per_s:g} messages per second: {dropped} "
            "dropped (reported at most once a second)",
            {"max_messages_per_s": self.settings.max_messages_per_s,
             "message_burst": self.settings.message_burst, "dropped": dropped})
