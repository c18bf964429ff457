"""The one bounded queue (drop policy, close) and the one pacing rule (deadlines, resync)."""

from __future__ import annotations

import asyncio

import pytest

from websocket_service.channel import ChannelClosed, DropOldest
from websocket_service.clock import Clock
from websocket_service.pacing import Pacer, PhaseSpreader


def test_drop_oldest_keeps_the_newest_and_counts_what_it_dropped():
    q: DropOldest[int] = DropOldest(3)
    assert [q.put(i) for i in range(5)] == [0, 0, 0, 1, 1]
    assert q.dropped == 2 and len(q) == 3
    assert [q.get_nowait() for _ in range(3)] == [2, 3, 4]
    with pytest.raises(IndexError):
        q.get_nowait()


def test_items_that_are_not_droppable_are_never_dropped_nor_counted():
    q: DropOldest[str] = DropOldest(2, droppable=lambda s: s.startswith("f"))
    for item in ("e1", "f1", "e2", "f2", "f3", "e3", "f4"):
        q.put(item)
    assert q.dropped == 2 and q.waiting == 2
    assert [q.get_nowait() for _ in range(len(q))] == ["e1", "e2", "f3", "e3", "f4"]
    assert q.waiting == 0


def test_peek_shows_the_oldest_item_and_leaves_it():
    q: DropOldest[str] = DropOldest(2, droppable=lambda s: s.startswith("f"))
    with pytest.raises(IndexError):
        q.peek()
    for item in ("e1", "f1", "f2"):
        q.put(item)
    assert q.peek() == "e1" and len(q) == 3 and q.waiting == 2
    assert q.get_nowait() == "e1" and q.peek() == "f1"


def test_a_closed_channel_drains_then_says_closed():
    async def main():
        q: DropOldest[int] = DropOldest(4)
        got = asyncio.create_task(q.get())
        await asyncio.sleep(0)  # the consumer waits on an empty channel
        q.put(7)
        assert await got == 7
        q.put(8)
        q.close()
        assert await q.get() == 8
        with pytest.raises(ChannelClosed):
            await q.get()

    asyncio.run(main())


def test_a_channel_needs_room_for_one():
    with pytest.raises(ValueError):
        DropOldest(0)


class SteppedClock(Clock):
    """Sleeping moves time to the deadline, plus a stall the test arms."""

    def __init__(self) -> None:
        self.t = 50.0
        self.stall = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        self.sleeps.append(deadline)
        self.t = max(self.t, deadline) + self.stall
        self.stall = 0.0


def test_pacer_sleeps_to_absolute_deadlines_and_skips_ahead_when_far_behind():
    async def main():
        clock = SteppedClock()
        pacer = Pacer(clock, 25, resync_after=3)
        got = [await pacer.next() for _ in range(3)]
        assert got == [(0, 0), (1, 0), (2, 0)]
        assert clock.sleeps == [50.0, 50.04, 50.08]
        clock.stall = 0.10  # 2.5 frames late: within the allowance, frames follow at once
        assert await pacer.next() == (3, 0)
        assert await pacer.next() == (4, 0)
        # frame 5 is due at 50.20; the clock is at 50.22 and stalls 0.31 s: 8.25 frames late,
        # so the 8 missed frames are skipped and frame 13 is shown at once
        clock.stall = 0.31
        assert await pacer.next() == (13, 8)
        assert await pacer.next() == (14, 0)
        assert clock.sleeps[-1] == pytest.approx(50.56)
        assert pacer.skipped == 8

    asyncio.run(main())


def test_a_shifted_pacer_moves_its_later_deadlines_not_its_frame_numbers():
    async def main():
        clock = SteppedClock()
        pacer = Pacer(clock, 25)
        assert await pacer.next() == (0, 0)
        pacer.shift(0.012)  # later: the next tick 52 ms after this one
        assert await pacer.next() == (1, 0)
        pacer.shift(-0.030)  # earlier: the next 10 ms after
        assert await pacer.next() == (2, 0)
        assert await pacer.next() == (3, 0)
        assert clock.sleeps == pytest.approx([50.0, 50.052, 50.062, 50.102])
        assert pacer.phase() == pytest.approx((50.0 - 0.018) % 0.04)
        assert pacer.skipped == 0

    asyncio.run(main())


def test_a_pacer_that_moved_counts_in_the_slot_nearest_its_new_phase():
    spread = PhaseSpreader(25, slots=8)
    slot, _ = spread.claim(100.0)
    assert slot == 0 and spread.used() == [1, 0, 0, 0, 0, 0, 0, 0]
    slot = spread.move(slot, 0.012)  # 12 ms into the period: nearest slot is 10 ms (2)
    assert slot == 2 and spread.used() == [0, 0, 1, 0, 0, 0, 0, 0]
    slot = spread.move(slot, 0.039)  # 39 ms is 1 ms before the next period's slot 0
    assert slot == 0 and spread.used() == [1, 0, 0, 0, 0, 0, 0, 0]
    spread.release(slot)
    assert spread.used() == [0] * 8


def test_pacer_refuses_nonsense():
    with pytest.raises(ValueError):
        Pacer(Clock(), 0)
    with pytest.raises(ValueError):
        Pacer(Clock(), 25, resync_after=0)


def test_pacers_started_together_are_spread_over_the_period():
    spread = PhaseSpreader(25, slots=8)
    now = 100.013  # 16 sessions opened in the same instant
    claims = [spread.claim(now) for _ in range(16)]
    assert sorted(slot for slot, _ in claims) == sorted(list(range(8)) * 2)
    assert spread.used() == [2] * 8
    for slot, first in claims:
        assert now <= first < now + 0.04  # the first tick waits at most one period
        periods = (first - slot * 0.005) / 0.04  # ticks on its slot's phase
        assert periods == pytest.approx(round(periods), abs=1e-6)
    # the first eight take the slots in the order they come after now (0.013 s into a period)
    assert [slot for slot, _ in claims[:8]] == [3, 4, 5, 6, 7, 0, 1, 2]
    assert claims[0][1] == pytest.approx(100.015)


def test_a_released_phase_is_the_next_one_taken():
    spread = PhaseSpreader(25, slots=4)
    slots = [spread.claim(5.0)[0] for _ in range(4)]
    spread.release(slots[2])
    assert spread.used() == [1, 1, 0, 1]
    assert spread.claim(7.0) == (2, pytest.approx(7.02))
    with pytest.raises(ValueError):
        PhaseSpreader(25, slots=4).release(0)  # never taken
    with pytest.raises(ValueError):
        PhaseSpreader(0)
    with pytest.raises(ValueError):
        PhaseSpreader(25, slots=0)
