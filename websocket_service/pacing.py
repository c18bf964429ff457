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

    def shift(self, seconds: float) -> None:
        """Move every deadline from the next one on by ``seconds`` (later if positive): the
        frame numbers stay, only their times move. The playout lines its ticks up with an
        utterance's schedule this way (:class:`~.playout.SpeechSchedule`)."""
        assert self.t0 is not None, "the pacer has not started"
        self.t0 += seconds

    def phase(self) -> float:
        """Seconds into each period (of the clock) that this pacer ticks."""
        assert self.t0 is not None, "the pacer has not started"
        return self.t0 % self.period

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


class PhaseSpreader:
    """Spreads the pacers of one process evenly over the frame period.

    A pacer started at ``now`` ticks at ``now + n / fps``: sessions opened together (a burst of
    clients, every client reconnecting after a restart) then tick together, for as long as
    they live. Each tick composes a frame, encodes it and sends it, so 16 sessions ticking in
    the same millisecond queue 16 encodes on the media threads and 16 sends on the event loop
    at once, and nothing in the other 39 ms. Measured at 16 speaking sessions on 2 cores
    (sessions opened within 12 ms of each other): every session's ticks fell within 1 ms of
    the others'; spread over 8 phases, the event loop's lag p99 fell from 5-8 ms to ~4 ms
    (docs/BENCHMARKS.md section 4).

    The period is cut into ``slots`` phases; a new pacer takes the least-used one (the first
    to come among equals), so its first tick waits at most one period. Not thread-safe: one
    event loop's pacers share one spreader.
    """

    def __init__(self, fps: float, slots: int = 8) -> None:
        if fps <= 0 or slots < 1:
            raise ValueError("fps must be > 0 and slots >= 1")
        self.period = 1.0 / fps
        self.slots = slots
        self._used = [0] * slots

    def phase(self, slot: int) -> float:
        """Seconds into each period (of the monotonic clock) that ``slot``'s pacers tick."""
        return slot * self.period / self.slots

    def claim(self, now: float) -> tuple[int, float]:
        """(the slot taken, the first tick's time: at ``now`` or within one period after)."""

        def wait(k: int) -> float:
            return (self.phase(k) - now) % self.period

        slot = min(range(self.slots), key=lambda k: (self._used[k], wait(k)))
        self._used[slot] += 1
        return slot, now + wait(slot)

    def move(self, slot: int, phase: float) -> int:
        """A pacer in ``slot`` now ticks at ``phase`` (it lined up with an utterance): the
        slot nearest to that phase is counted instead (returned). The spreading only places
        new pacers, and a moved one is counted where it ticks."""
        self.release(slot)
        new = round((phase % self.period) / (self.period / self.slots)) % self.slots
        self._used[new] += 1
        return new

    def release(self, slot: int) -> None:
        """Give back a slot taken by :meth:`claim` (the pacer stopped)."""
        if self._used[slot] <= 0:
            raise ValueError(f"phase slot {slot} is not taken")
        self._used[slot] -= 1

    def used(self) -> list[int]:
        """Pacers per slot (a copy)."""
        return list(self._used)
