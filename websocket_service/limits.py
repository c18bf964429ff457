"""Rate limits: a token bucket per connection for client messages, coalesced reports of the
messages it drops, and a bound on unauthenticated sockets per client address."""

from __future__ import annotations

from .errors import RateLimitExceeded


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; each message takes one.

    Time comes from the caller (the session clock), so tests can drive it.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Take a token if one is there; False: the message is over the limit."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class DropReport:
    """Dropped messages reported at most once per ``window_s``: one error with a count, not
    one per message (a flood's errors would be a flood of their own)."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self.unreported = 0
        self._at = float("-inf")  # when the last report went out

    def drop(self, now: float) -> int:
        """Count a dropped message; how many to report now (0: wait for :meth:`due_at`)."""
        self.unreported += 1
        return self.take(now)

    def due_at(self) -> float | None:
        """When the drops not yet reported are due (None: there are none)."""
        return self._at + self.window_s if self.unreported else None

    def take(self, now: float) -> int:
        """The drops to report now (0 inside the window), and the window starts again."""
        if not self.unreported or now < self._at + self.window_s:
            return 0
        n, self.unreported, self._at = self.unreported, 0, now
        return n


class Pending:
    """One socket not yet authenticated; :meth:`done` (idempotent) once it is, or closed."""

    def __init__(self, counts: dict[str, int], addr: str) -> None:
        self._counts, self._addr, self._open = counts, addr, True

    def done(self) -> None:
        if self._open:
            self._open = False
            left = self._counts[self._addr] - 1
            if left:
                self._counts[self._addr] = left
            else:
                del self._counts[self._addr]  # nothing is kept for an address with none


class PendingLimit:
    """Sockets not yet authenticated, per client address: at most ``limit`` at a time
    (0: no limit), so that one address cannot hold many sockets without credentials."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def enter(self, addr: str | None) -> Pending:
        """Count a new socket from ``addr``; RateLimitExceeded (fatal) at the limit."""
        key = addr or "-"
        n = self._counts.get(key, 0)
        if self.limit and n >= self.limit:
            raise RateLimitExceeded(
                f"this address already has {self.limit} connections that have not "
                "authenticated yet; try again later", {"max_pending_per_ip": self.limit},
                fatal=True)
        self._counts[key] = n + 1
        return Pending(self._counts, key)

    def count(self, addr: str | None) -> int:
        return self._counts.get(addr or "-", 0)
