"""The one pacing rule: frame ``n`` is due at ``t0 + n / fps``; far behind, skip ahead.

Every place that sends frames at a steady rate (the session's playout, the pipecat output
transports) paces with a :class:`Pacer`: it sleeps until the next frame's absolute deadline
(so timing errors never accumulate), and when it wakes more than ``resync_after`` frames late
(a stalled event loop, a suspended machine) it skips the frames it missed instead of bursting
them out, and says how many it skipped.
"""

from __future__ import annotations

from .clock import Clock

#: frames late after which a pacer skips ahead (the ``RESYNC_AFTER_FRAMES`` default)
RESYNC_AFTER_FRAMES = 3


class Pacer:
    """Absolute deadlines at ``fps`` on ``clock``, from the first :meth:`next` (or ``t0``)."""

    def __init__(self, clock: Clock, fps: float, resync_after: int = RESYNC_AFTER_FRAMES,
                 t0: float | None = None) -> None:
        if fps <= 0 or resync_after < 1:
            raise ValueError("fps must be > 0 and resync_after >= 1")
        self.clock = clock
        self.period = 1.0 / fps
        self.resync_after = resync_after
        self.t0 = t0
        self.n = 0  # the next frame's number
        self.skipped = 0  # frames skipped in all

    def due(self, n: int) -> float:
        """When frame ``n`` is due (after the first :meth:`next`, or with ``t0`` given)."""
        assert self.t0 is not None, "the pacer has not started"
        return self.t0 + n * self.period

    def catch_up(self, now: float) -> int:
        """Skip ahead if the next frame is more than ``resync_after`` frames late at ``now``;
        how many frames were skipped (0 when on time)."""
        late = now - self.due(self.n)
        if late <= self.resync_after * self.period:
            return 0
        skip = int(late // self.period)
        self.n += skip
        self.skipped += skip
        return skip

    async def next(self) -> tuple[int, int]:
        """Wait for the next frame's deadline: (its number, frames skipped to reach it)."""
        if self.t0 is None:
            self.t0 = self.clock.now()
        await self.clock.sleep_until(self.due(self.n))
        skip = self.catch_up(self.clock.now())
        n = self.n
        self.n += 1
        return n, skip
