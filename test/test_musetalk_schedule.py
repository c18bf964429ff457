"""Deadline batching on a fake clock: the scheduler's order and launch rule, no starvation,
the cost model and its tables, admission, the GPU stand-in, and a 16-session simulation.

Times are plain floats (seconds); nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math

import pytest

from websocket_service.engines.musetalk.schedule import (
    CostModel,
    DeadlineScheduler,
    admission_limit,
)
from websocket_service.engines.musetalk.standin import StandIn

MS = 0.001


def _sched(max_batch: int = 32, max_wait_s: float = 10.0, per_frame_s: float = 0.010,
           margin_s: float = 0.002) -> DeadlineScheduler:
    return DeadlineScheduler(lambda n: per_frame_s * n, max_batch, max_wait_s, margin_s)


# --- order -------------------------------------------------------------------------------------

def test_pop_batch_is_edf_with_fifo_ties_and_capped_at_max_batch():
    s = _sched(max_batch=4)
    for due, name in [(3.0, "c1"), (1.0, "a1"), (2.0, "b"), (1.0, "a2"), (3.0, "c2"), (1.0, "a3")]:
        s.push(due, name, now=0.0)
    assert len(s) == 6
    assert s.pop_batch() == ["a1", "a2", "a3", "b"]   # EDF, equal dues in push order, 4 at most
    assert len(s) == 2
    assert s.pop_batch() == ["c1", "c2"]
    assert s.pop_batch() == [] and len(s) == 0


def test_fifo_ties_hold_for_many_equal_dues():
    # a heap without a sequence number breaks ties arbitrarily; this catches it
    s = _sched(max_batch=32)
    for i in range(32):
        s.push(5.0, i, now=0.0)
    assert s.pop_batch() == list(range(32))


# --- the launch rule and decide()'s wake times ---------------------------------------------------

def test_decide_is_inf_when_empty_also_after_popping_everything():
    s = _sched()
    assert s.decide(0.0) == math.inf
    s.push(1.0, "x", now=0.0)
    assert s.decide(0.0) is not None
    s.pop_batch()
    assert s.decide(0.0) == math.inf


def test_launches_when_full():
    s = _sched(max_batch=4)    # slack and wait far away: only fullness can launch
    for i in range(3):
        s.push(100.0, i, now=0.0)
    wake = s.decide(0.0)
    assert wake is not None and wake > 1.0
    s.push(100.0, 3, now=0.0)
    assert s.decide(0.0) is None
    assert s.pop_batch() == [0, 1, 2, 3]


def test_launches_when_the_earliest_dues_slack_runs_out():
    s = _sched(per_frame_s=0.010, margin_s=0.002)
    s.push(0.100, "a", now=0.0)
    s.push(0.200, "b", now=0.0)
    # due 0.100 - predicted cost of the batch that would launch (2 frames: 0.020) - margin 0.002
    assert s.decide(0.0) == pytest.approx(0.078)
    assert s.decide(0.0779) == pytest.approx(0.078)
    # a bigger batch takes longer, so the launch comes earlier: 0.100 - 0.030 - 0.002
    s.push(0.300, "c", now=0.0)
    wake = s.decide(0.0)
    assert wake == pytest.approx(0.068)
    assert s.decide(wake) is None          # exactly at the wake time it launches
    assert s.pop_batch() == ["a", "b", "c"]


def test_launches_after_max_wait_of_the_oldest_item():
    s = _sched(max_wait_s=0.005)           # dues far away: only the wait can launch
    s.push(50.0, "a", now=1.000)
    assert s.decide(1.000) == pytest.approx(1.005)
    s.push(40.0, "b", now=1.003)           # earlier due, but "a" is still the oldest
    assert s.decide(1.003) == pytest.approx(1.005)
    assert s.decide(1.004) is not None
    assert s.decide(1.005) is None
    assert s.pop_batch() == ["a", "b"]    # "a" waited max_wait: it goes before the earlier due
    s.push(50.0, "c", now=2.000)           # the wait restarts from the new oldest item
    assert s.decide(2.000) == pytest.approx(2.005)


def test_wake_time_is_the_earlier_of_wait_and_slack():
    s = _sched(max_wait_s=0.050, per_frame_s=0.010, margin_s=0.0)
    s.push(0.030, "tight", now=0.0)        # slack: 0.030 - 0.010 = 0.020 < wait 0.050
    assert s.decide(0.0) == pytest.approx(0.020)
    s.pop_batch()
    s.push(1.0, "loose", now=0.0)          # slack 0.990 > wait 0.050
    assert s.decide(0.0) == pytest.approx(0.050)


# --- no starvation -------------------------------------------------------------------------------

def test_a_late_due_item_is_not_starved_by_a_stream_of_tighter_ones():
    """Overload on purpose: 3 tight frames arrive every ms, a batch of 4 takes 3 ms. Plain EDF
    would never take the late-due item (there are always 4 earlier dues); it must leave within
    max_wait plus one batch."""
    max_wait, batch_s = 0.020, 0.003
    s = DeadlineScheduler(lambda n: batch_s, max_batch=4, max_wait_s=max_wait)
    s.push(10.0, "late", now=0.0)
    launched_at, busy_until, t = None, 0.0, 0.0
    for tick in range(1, 200):
        t = tick * MS
        for k in range(3):
            s.push(t + 0.010, ("tight", tick, k), now=t)
        if t >= busy_until and s.decide(t) is None:
            batch = s.pop_batch()
            busy_until = t + batch_s
            if "late" in batch:
                launched_at = t
    assert launched_at is not None, "the late-due item never launched"
    assert launched_at <= max_wait + batch_s + MS
    assert len(s) > 50                     # really overloaded: the tight stream kept coming


# --- drop ----------------------------------------------------------------------------------------

def test_drop_removes_matching_items_and_their_deadlines():
    s = _sched(per_frame_s=0.010, margin_s=0.0)
    s.push(0.050, ("gone", 0), now=0.0)
    s.push(0.500, ("kept", 0), now=0.0)
    s.push(0.060, ("gone", 1), now=0.0)
    s.push(0.600, ("kept", 1), now=0.0)
    assert s.drop(lambda it: it[0] == "gone") == [("gone", 0), ("gone", 1)]
    assert len(s) == 2
    # the dropped items' tight dues no longer drive the launch: 0.500 - 0.020
    assert s.decide(0.0) == pytest.approx(0.480)
    assert s.drop(lambda it: False) == []
    assert s.pop_batch() == [("kept", 0), ("kept", 1)]
    s.push(1.0, "x", now=0.0)
    s.drop(lambda it: True)
    assert len(s) == 0 and s.decide(0.0) == math.inf and s.pop_batch() == []


# --- the cost model ------------------------------------------------------------------------------

def test_cost_model_interpolates_between_points_and_pads_to_the_bucket():
    m = CostModel.measured({1: 0.010, 8: 0.024})
    assert m.frames_s(1) == pytest.approx(0.010)
    assert m.frames_s(2) == pytest.approx(0.012)           # 0.010 + 0.014 * 1/7
    assert m.frames_s(3) == pytest.approx(0.016)           # padded to bucket 4: 0.010 + 0.014 * 3/7
    assert m.frames_s(4) == pytest.approx(0.016)
    assert m.frames_s(5) == m.frames_s(8) == pytest.approx(0.024)


def test_cost_model_beyond_its_points():
    m = CostModel.measured({1: 0.010, 8: 0.024})
    assert m.frames_s(16) == pytest.approx(0.040)          # the last slope, 2 ms/frame, goes on
    assert m.frames_s(32) == pytest.approx(0.072)
    below = CostModel.measured({4: 0.020, 8: 0.030})
    assert below.frames_s(1) == pytest.approx(0.020)       # flat below the first point
    single = CostModel.measured({8: 0.016})
    assert single.frames_s(32) == pytest.approx(0.064)     # one point: proportional beyond it
    for n in (0, 33):
        with pytest.raises(ValueError):
            m.frames_s(n)


def test_cost_tables_match_the_measured_h100_points():
    h = CostModel.from_table("h100")
    assert h.frames_s(1) == pytest.approx(6.8 * MS)         # UNet 4.4 + SD-VAE 2.4
    assert h.frames_s(8) == pytest.approx((9.3 + 2.4 + 46.8 * 7 / 31) * MS)
    assert h.frames_s(32) == pytest.approx(70.0 * MS)       # 20.8 + 49.2
    assert h.whisper_s(0) == 0.0
    assert h.whisper_s(1) == pytest.approx(1.55 * MS)       # estimate: 1.5 + 0.05 per window
    assert h.whisper_s(16) == pytest.approx(2.3 * MS)
    assert h.whisper_s(64) == pytest.approx(4.7 * MS)       # beyond the last point
    t = CostModel.from_table("h100-taesd")
    assert t.frames_s(32) == pytest.approx((20.8 + 0.3 + 0.25 * 32) * MS)
    assert 32 / t.frames_s(32) > 800 and 32 / h.frames_s(32) > 400   # the frame rates


def test_cost_table_errors():
    with pytest.raises(ValueError, match="h100, h100-taesd"):
        CostModel.from_table("a100")
    good = {"unet_ms": {"1": 4.0}, "decoder_ms": {"1": 2.0}, "whisper_ms": {"1": 1.0}}
    assert CostModel.from_entry("ok", good).frames_s(1) == pytest.approx(0.006)
    bad = [{k: v for k, v in good.items() if k != "decoder_ms"},
           {**good, "unet_ms": {}},
           {**good, "unet_ms": {"1": -1.0}},
           {**good, "unet_ms": {"0": 1.0}},
           {**good, "unet_ms": {"1.5": 1.0}},
           {**good, "whisper_ms": {"1": "fast"}},
           {**good, "decoder_ms": [1.0]}]
    for entry in bad:
        with pytest.raises(ValueError):
            CostModel.from_entry("bad", entry)
    with pytest.raises(ValueError):
        CostModel.measured({})


DEC8 = 2.4 + 46.8 * 7 / 31  # the h100 table's SD-VAE at bucket 8, ms


def test_decoding_in_chunks_costs_each_chunks_bucket():
    h = CostModel.from_table("h100", chunk=8)
    assert h.unet_s(20) == pytest.approx(20.8 * MS)        # the UNet's bucket 32
    assert h.first_s(32) == pytest.approx((20.8 + DEC8) * MS)
    assert h.chunk_s(8, 32) == pytest.approx(DEC8 * MS)
    assert h.frames_s(32) == pytest.approx((20.8 + 4 * DEC8) * MS)   # 72.7 ms against 70.0
    # 20 frames: UNet bucket 32, decoder 8 + 8 + 4: the padding is only the UNet's
    assert h.frames_s(20) == pytest.approx((20.8 + 2 * DEC8 + 2.4 + 46.8 * 3 / 31) * MS)
    assert h.frames_s(5) == h.first_s(5) == pytest.approx((9.3 + DEC8) * MS)  # one chunk
    whole = CostModel.from_table("h100")
    assert whole.first_s(32) == whole.frames_s(32) == pytest.approx(70.0 * MS)
    # a chunked batch's first faces come after ~the UNet and a quarter of the decoder
    assert h.first_s(32) < 0.5 * whole.frames_s(32)
    with pytest.raises(ValueError, match="chunk"):
        CostModel.measured({1: 0.01}, chunk=8)               # no decoder costs to chunk
    m = CostModel.measured({1: 0.004, 32: 0.020}, decoder={1: 0.002, 32: 0.048}, chunk=16)
    assert m.frames_s(32) == pytest.approx(0.020 + 2 * (0.002 + 0.046 * 15 / 31))
    for _ in range(80):                                      # measured 20 % slower: both parts
        m.observe(32, 1.2 * (0.020 + 2 * (0.002 + 0.046 * 15 / 31)))
    assert m.unet_s(32) == pytest.approx(0.024, rel=1e-4)
    assert m.first_s(32) == pytest.approx(1.2 * (0.020 + 0.002 + 0.046 * 15 / 31), rel=1e-4)
    assert m.unet_s(16) == pytest.approx(0.004 + 0.016 * 15 / 31)   # another bucket: unmoved


def test_observe_moves_the_estimate_of_that_bucket_only():
    m = CostModel.measured({1: 0.010, 8: 0.024, 32: 0.072})
    before = {b: m.frames_s(b) for b in (4, 8, 16)}
    m.observe(6, 0.050)                    # a batch of 6 ran in bucket 8
    assert before[8] < m.frames_s(8) < 0.050
    for _ in range(60):
        m.observe(8, 0.050)
    assert m.frames_s(8) == pytest.approx(0.050, abs=1e-5)
    assert m.frames_s(5) == m.frames_s(8)
    assert m.frames_s(4) == before[4] and m.frames_s(16) == before[16]
    for bad in (-0.001, math.nan, math.inf):
        with pytest.raises(ValueError):
            m.observe(8, bad)


# --- admission -----------------------------------------------------------------------------------

def test_admission_limit_on_a_hand_computed_table():
    # frames ms: 10, 12, 16, 24, 40, 72; whisper 2 ms per window (one point: proportional)
    m = CostModel.measured({1: 0.010, 2: 0.012, 4: 0.016, 8: 0.024, 16: 0.040, 32: 0.072},
                           whisper={1: 0.002})
    # b32, hop 2: 32 / (0.072 + 16 * 0.002) = 307.7 frames/s; * 0.9 / 25 = 11.08
    assert admission_limit(m, max_batch=32, hop=2) == 11
    # b16: 16 / (0.040 + 0.016) = 285.7 -> 10.29
    assert admission_limit(m, max_batch=16, hop=2) == 10
    assert admission_limit(m, max_batch=32, hop=2, utilisation=1.0) == 12     # 12.31
    # hop 1 doubles the windows: b32 32 / (0.072 + 0.064) * 0.9 / 25 = 8.47
    assert admission_limit(m, max_batch=32, hop=1) == 8
    assert admission_limit(m, max_batch=1, hop=2) == 3     # b1: 0.9 / (25 * 0.012) = 3.0
    # exactly 4 sessions, computed in floats as 3.9999999999999996: must not floor to 3
    exact = CostModel.measured({1: 0.004}, whisper={1: 0.002})
    assert admission_limit(exact, max_batch=1, hop=2, utilisation=0.6) == 4
    for kw in ({"hop": 0}, {"hop": 2, "utilisation": 0.0}, {"hop": 2, "fps": 0.0}):
        with pytest.raises(ValueError):
            admission_limit(m, max_batch=32, **kw)


def test_admission_limits_of_the_h100_tables():
    h, t = CostModel.from_table("h100"), CostModel.from_table("h100-taesd")
    # 32 / (70.0 + 2.3 ms) * 0.9 / 25 = 15.9: the 16 sessions is ~90.4 % of the GPU
    assert admission_limit(h, max_batch=32, hop=2) == 15
    assert admission_limit(h, max_batch=32, hop=2, utilisation=0.95) == 16
    # 32 / (29.1 + 2.3 ms) * 0.9 / 25 = 36.7
    assert admission_limit(t, max_batch=32, hop=2) == 36


# --- the stand-in --------------------------------------------------------------------------------

def test_standin_waits_the_tables_times():
    waits: list[float] = []
    cost = CostModel.from_table("h100", chunk=8)
    gpu = StandIn(cost, sleep=waits.append)
    gpu.whisper(16)
    gpu.wait_unet(20)                      # the UNet's bucket 32
    gpu.wait_chunk(8, 20)
    gpu.wait_chunk(3, 20)                  # padded up to the decoder's bucket of 4
    assert waits == [pytest.approx(2.3 * MS), pytest.approx(20.8 * MS),
                     pytest.approx(DEC8 * MS), pytest.approx((2.4 + 46.8 * 3 / 31) * MS)]
    gpu.whisper(0)
    gpu.wait_unet(0)
    gpu.wait_chunk(0, 4)
    assert len(waits) == 4                 # nothing to run: no wait
    for bad in (lambda: gpu.wait_unet(-1), lambda: gpu.whisper(-1),
                lambda: gpu.wait_unet(33),  # past the largest bucket
                lambda: gpu.wait_chunk(5, 4), lambda: gpu.wait_chunk(-1, 4)):
        with pytest.raises(ValueError):
            bad()


# --- simulation: 16 sessions on the H100 table ---------------------------------------------------

def _simulate(table: str, sessions: int, max_wait_s: float, *, stagger: bool, hop: int = 2,
              fps: float = 25.0, seconds: float = 8.0, budget_s: float = 0.150
              ) -> tuple[list[float], list[float], float]:
    """One GPU on a fake clock, as the core runs it: whenever it is idle it first encodes every
    window that has arrived (one whisper call), pushes their frames (due = arrival + budget),
    then launches a batch if the scheduler says so, else waits for the wake time or the next
    window. Returns per frame the launch and the finish times minus due, and the GPU's load."""
    cost = CostModel.from_table(table)
    period = hop / fps
    arrivals = sorted((i * period / sessions if stagger else 0.0) + k * period
                      for i in range(sessions) for k in range(round(seconds / period)))
    s = DeadlineScheduler(cost.frames_s, max_batch=32, max_wait_s=max_wait_s)
    launch_slack, finish_slack = [], []
    t, nxt, busy = 0.0, 0, 0.0
    while nxt < len(arrivals) or len(s):
        ready = []
        while nxt < len(arrivals) and arrivals[nxt] <= t:
            ready.append(arrivals[nxt])
            nxt += 1
        if ready:
            t += cost.whisper_s(len(ready))
            busy += cost.whisper_s(len(ready))
            for a in ready:
                for _ in range(hop):
                    s.push(a + budget_s, a + budget_s, now=t)
            continue
        wake = s.decide(t)
        if wake is None:
            dues = s.pop_batch()
            launch_slack += [t - due for due in dues]
            t += cost.frames_s(len(dues))
            busy += cost.frames_s(len(dues))
            finish_slack += [t - due for due in dues]
        else:
            t = min(wake, arrivals[nxt] if nxt < len(arrivals) else math.inf)
    return launch_slack, finish_slack, busy / t


@pytest.mark.parametrize("max_wait_s", [0.004, 0.040])
@pytest.mark.parametrize("stagger", [True, False], ids=["spread", "aligned"])
def test_16_sessions_on_the_h100_table_meet_a_150ms_budget(max_wait_s, stagger):
    """The issue's prediction: 16 sessions, hop 2, graphed UNet + compiled SD-VAE; every frame
    launched (and finished) before arrival + 150 ms, with the GPU really loaded."""
    launch, finish, load = _simulate("h100", 16, max_wait_s, stagger=stagger)
    assert len(launch) == 16 * 100 * 2
    assert max(launch) < 0
    assert max(finish) <= 1e-9
    assert load > 0.85


def test_the_simulation_can_miss_when_overloaded():
    # 24 sessions need ~135 % of the H100 on this table: frames must come out late
    _, finish, load = _simulate("h100", 24, 0.040, stagger=True)
    assert load > 0.99 and max(finish) > 0.5


def test_a_batch_is_not_padded_when_a_smaller_bucket_costs_less_per_frame():
    cost = CostModel.from_table("h100")
    s = DeadlineScheduler(cost.frames_s, max_batch=32, max_wait_s=0.004)
    for i in range(20):
        s.push(10.0, i, now=0.0)
    assert s.decide(0.004) is None           # the oldest waited its 4 ms
    # 20 padded to 32: 70 ms / 20 = 3.5 ms a frame; 16 alone: 38 ms / 16 = 2.4 ms a frame
    assert s.launch_size() == 16 and s.pop_batch() == list(range(16))
    for i in range(20, 46):
        s.push(10.0, i, now=0.01)
    assert len(s) == 30 and s.launch_size() == 30   # 70 / 30 = 2.33 ms: padding 2 pays
    assert s.pop_batch() == list(range(16, 46))
    # a cost that grows with every frame never splits a batch
    linear = DeadlineScheduler(lambda n: 0.001 + 0.002 * n, max_batch=32, max_wait_s=0.0)
    for i in range(20):
        linear.push(1.0, i, now=0.0)
    assert linear.launch_size() == 20


def test_16_spread_sessions_get_their_faces_within_110ms_without_padding():
    """Padding a batch up to its bucket wastes the GPU exactly when it is loaded: with every
    launch padded, 16 spread sessions took 140 ms p95 from window to face and 32 % of the frames
    missed a 120 ms budget; launching the cheaper bucket instead keeps the p95 near 110 ms."""
    _, finish, load = _simulate("h100", 16, 0.004, stagger=True, budget_s=0.120, seconds=20)
    latency = sorted(0.120 + f for f in finish)
    assert latency[int(0.95 * len(latency))] <= 0.110
    assert sum(f > 0 for f in finish) / len(finish) < 0.05
    assert load > 0.95
