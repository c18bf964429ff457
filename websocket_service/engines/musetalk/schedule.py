"""Deadline batching for the GPU path: a per-batch cost model, the launch rule, admission.

Every video frame of a speaking session is *due* at the time its slot is played out. The
inference core holds the frames whose audio features are ready in a :class:`DeadlineScheduler`
and asks it, on every step, whether to launch a batch now. The rule follows two public systems
(../shared/GPU_PATH.md): Triton's dynamic batcher, which bounds how long a request may wait for
a fuller batch (``max_queue_delay``), and Clockwork (OSDI '20), which shows that a network's
time per batch is predictable enough to schedule against deadlines. So a batch launches when

* it is full (``max_batch``): waiting longer cannot make it bigger;
* the earliest-due frame's slack is gone: ``due - predicted batch time - margin <= now``;
  waiting longer would make that frame late;
* the oldest frame has waited ``max_wait_s``: a bounded queue delay, whatever the deadlines say.

:class:`CostModel` predicts the batch times: from the H100 table in ``gpu_costs.json`` (the
``GPU_STANDIN`` stand-in and capacity planning), or from the real engine's warm-up replay
times, kept current with :meth:`CostModel.observe`. :func:`admission_limit` turns it into the
number of sessions the networks can serve in real time, so a session that would overload them is
refused at INIT instead of slowing every other one down.

Everything here is pure logic on times passed in (``time.monotonic()`` seconds in production, a
plain float in tests); nothing reads a clock or is thread-safe: one thread (the core's) owns it.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .graphs import BUCKETS, bucket_for, chunk_sizes

#: the file of per-batch cost tables (package data, next to this module)
TABLE_FILE = "gpu_costs.json"
#: weight of a new measurement in a bucket's moving average (:meth:`CostModel.observe`)
EWMA_ALPHA = 0.2

Points = list[tuple[float, float]]


def _points(raw: Mapping[Any, float], what: str) -> Points:
    """Sorted (n, value) pairs: whole batch sizes >= 1, finite times >= 0, at least one."""
    try:
        pts = sorted((float(n), float(v)) for n, v in raw.items())
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{what}: expected a mapping of batch size to time, got {raw!r}") from exc
    if not pts:
        raise ValueError(f"{what}: no points")
    for n, v in pts:
        if not (n >= 1 and n.is_integer() and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{what}: bad point {n:g} -> {v!r} (need a batch >= 1, time >= 0)")
    if len({n for n, _ in pts}) != len(pts):
        raise ValueError(f"{what}: the same batch size twice")
    return pts


def _interp(pts: Points, x: float) -> float:
    """Piecewise-linear through ``pts``; flat below the first point, the last slope beyond.

    With a single point the slope beyond it is value / n (time proportional to the batch):
    both extensions err on the slow side for a cost that grows with the batch, which is the
    safe side for deadlines and admission.
    """
    if x <= pts[0][0]:
        return pts[0][1]
    if len(pts) == 1:
        n0, v0 = pts[0]
        return v0 * x / n0
    for (n0, v0), (n1, v1) in itertools.pairwise(pts):
        if x <= n1:
            return v0 + (v1 - v0) * (x - n0) / (n1 - n0)
    (n0, v0), (n1, v1) = pts[-2], pts[-1]
    return v1 + (v1 - v0) * (x - n1) / (n1 - n0)


class CostModel:
    """Per-batch seconds of the networks, piecewise-linear in the batch size between points.

    A batch runs what runs once per batch (``frames``: the UNet, or the UNet and the decoder
    when no ``decoder`` is given) and, with a ``decoder``, the decoder once per chunk of
    ``chunk`` frames (:func:`~.graphs.chunk_sizes`; 0: once over the whole batch). Each part
    costs what its padded bucket costs, because that is the graph that replays: a batch of 20
    with chunks of 8 is the UNet's bucket 32 and the decoder's buckets 8, 8 and 4.
    ``whisper`` is per call over ``n`` windows and is not bucketed. Times are in seconds;
    ``whisper=None`` means unknown (counted as 0).

    :meth:`observe` corrects the prediction per UNet bucket from measured whole-batch times (a
    factor on both parts, moved by an EWMA).
    """

    def __init__(self, frames: Mapping[int, float], whisper: Mapping[int, float] | None = None,
                 *, name: str = "custom", buckets: tuple[int, ...] = BUCKETS,
                 decoder: Mapping[int, float] | None = None, chunk: int = 0) -> None:
        pts = _points(frames, f"{name}: frames")
        if chunk < 0 or (chunk and decoder is None):
            raise ValueError(f"{name}: chunk must be >= 0, and needs the decoder's own costs")
        self.name = name
        self.buckets = buckets
        self.chunk = int(chunk)
        self._once: dict[int, float] = {b: _interp(pts, b) for b in buckets}
        self._decoder: dict[int, float] = {b: 0.0 for b in buckets}
        if decoder is not None:
            dec = _points(decoder, f"{name}: decoder")
            self._decoder = {b: _interp(dec, b) for b in buckets}
        self._scale: dict[int, float] = {b: 1.0 for b in buckets}
        self._whisper: Points = _points(whisper, f"{name}: whisper") if whisper else [(1.0, 0.0)]

    @classmethod
    def from_table(cls, name: str, chunk: int = 0) -> CostModel:
        """The named entry of ``gpu_costs.json`` ("h100", "h100-taesd")."""
        tables = json.loads(resources.files(__package__).joinpath(TABLE_FILE).read_text("utf-8"))
        if name not in tables:
            raise ValueError(f"unknown GPU cost table {name!r}; known: {', '.join(sorted(tables))}")
        return cls.from_entry(name, tables[name], chunk)

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any], chunk: int = 0) -> CostModel:
        """One table entry: ``unet_ms``, ``decoder_ms``, ``whisper_ms`` point maps (milliseconds).

        The UNet and decoder are interpolated separately: their points need not be at the same
        batch sizes (the measurements were not).
        """
        try:
            unet, dec, whisper = entry["unet_ms"], entry["decoder_ms"], entry["whisper_ms"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{name}: needs unet_ms, decoder_ms and whisper_ms") from exc
        unet_pts, dec_pts = _points(unet, f"{name}: unet_ms"), _points(dec, f"{name}: decoder_ms")
        whisper_s = {int(n): v / 1000.0 for n, v in _points(whisper, f"{name}: whisper_ms")}
        return cls({int(n): v / 1000.0 for n, v in unet_pts}, whisper_s, name=name,
                   decoder={int(n): v / 1000.0 for n, v in dec_pts}, chunk=chunk)

    @classmethod
    def measured(cls, times: dict[int, float], whisper: Mapping[int, float] | None = None, *,
                 decoder: Mapping[int, float] | None = None, chunk: int = 0) -> CostModel:
        """From the real engine's warm-up replay seconds per bucket (``times``: the UNet's, or
        the whole network's without ``decoder``; buckets not timed are interpolated or
        extended as in the table)."""
        return cls(times, whisper, name="measured", decoder=decoder, chunk=chunk)

    def frames_s(self, n: int) -> float:
        """Seconds of a whole batch of ``n`` frames: the UNet's bucket and every decoder chunk."""
        b = bucket_for(n, self.buckets)
        dec = sum(self._decoder[bucket_for(c, self.buckets)] for c in chunk_sizes(n, self.chunk))
        return self._scale[b] * (self._once[b] + dec)

    def first_s(self, n: int) -> float:
        """Seconds from a batch's launch until its first chunk's faces are decoded."""
        b = bucket_for(n, self.buckets)
        first = chunk_sizes(n, self.chunk)[0]
        return self._scale[b] * (self._once[b] + self._decoder[bucket_for(first, self.buckets)])

    def chunk_s(self, c: int, n: int) -> float:
        """Seconds of one decoder chunk of ``c`` frames in a batch of ``n``."""
        return self._scale[bucket_for(n, self.buckets)] * self._decoder[bucket_for(c, self.buckets)]

    def unet_s(self, n: int) -> float:
        """Seconds of the once-per-batch part (the UNet) of a batch of ``n`` frames."""
        b = bucket_for(n, self.buckets)
        return self._scale[b] * self._once[b]

    def whisper_s(self, n: int) -> float:
        """Whisper-encoder seconds for one call over ``n`` windows (0 for none)."""
        return _interp(self._whisper, n) if n >= 1 else 0.0

    def observe(self, n: int, seconds: float) -> None:
        """A measured time of a whole batch of ``n`` frames: moves its UNet bucket's factor
        (EWMA), so that bucket's predictions move towards what it measures.

        The real GPU drifts from its warm-up figures (clocks, other work on the card); the
        scheduler's slack rule is only as good as this estimate.
        """
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"batch time must be finite and >= 0, got {seconds!r}")
        b = bucket_for(n, self.buckets)
        base = self.frames_s(n) / self._scale[b]
        if base > 0:
            self._scale[b] += EWMA_ALPHA * (seconds / base - self._scale[b])

    def __repr__(self) -> str:
        ms = ", ".join(f"{b}: {self.frames_s(b) * 1000:.2f}" for b in self.buckets)
        return f"CostModel({self.name!r}, chunk={self.chunk}, frames_ms={{{ms}}})"


@dataclass(slots=True)
class _Entry:
    due: float
    pushed: float
    item: Any


class DeadlineScheduler:
    """Frames waiting for the GPU, and when to launch the next batch (see the module docstring).

    Order: earliest due first (EDF); equal dues in push order (FIFO). One exception keeps EDF
    from starving: a frame that has waited ``max_wait_s`` is taken before any frame that has
    not (oldest first), so a late-due frame behind a steady stream of tighter-due ones still
    leaves within about ``max_wait_s`` plus one batch. (So with ``max_wait_s=0`` every frame
    counts as having waited and batches go out in push order.)

    ``cost(n)``: predicted seconds of a batch of ``n`` frames (e.g. ``CostModel.frames_s``).
    ``margin_s``: slack kept for the launch itself and the copy back. Time is whatever the
    caller passes (``now``); :meth:`pop_batch` uses the latest time seen by :meth:`push` or
    :meth:`decide` to tell which frames have waited too long.
    """

    def __init__(self, cost: Callable[[int], float], max_batch: int, max_wait_s: float,
                 margin_s: float = 0.002) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0 or margin_s < 0:
            raise ValueError("max_wait_s and margin_s must be >= 0")
        self.cost, self.max_batch = cost, max_batch
        self.max_wait_s, self.margin_s = max_wait_s, margin_s
        self._live: dict[int, _Entry] = {}
        self._by_due: list[tuple[float, int]] = []     # (due, seq): EDF, FIFO on ties
        self._by_age: list[tuple[float, int]] = []     # (pushed, seq): the oldest first
        self._seq = itertools.count()
        self._now = -math.inf

    def __len__(self) -> int:
        return len(self._live)

    def push(self, due: float, item: Any, now: float) -> None:
        """Queue ``item`` (one frame), due at ``due``; the caller should :meth:`decide` again."""
        seq = next(self._seq)
        self._live[seq] = _Entry(due, now, item)
        heapq.heappush(self._by_due, (due, seq))
        heapq.heappush(self._by_age, (now, seq))
        self._now = max(self._now, now)

    def decide(self, now: float) -> float | None:
        """None: launch a batch now. Else the time to decide again (``math.inf`` when empty).

        The time returned assumes nothing is pushed meanwhile: a push can bring the launch
        forward, so call it again after every push.
        """
        self._now = max(self._now, now)
        if not self._live:
            return math.inf
        if len(self._live) >= self.max_batch:
            return None
        launch_at = self._launch_at()
        return None if launch_at <= now else launch_at

    def _launch_at(self) -> float:
        """The latest time the queue as it is may wait: max wait of the oldest, or the slack
        of the earliest due against the batch that would launch."""
        oldest = self._live[self._top(self._by_age)].pushed
        earliest = self._live[self._top(self._by_due)].due
        # the whole queue's cost, even when the next launch takes only part of it: launching on
        # that (earlier) slack keeps a loaded GPU ahead (16 spread sessions on the H100 table:
        # 108 ms p95 from window to face, against 137 ms on the part's cost)
        predicted = self.cost(min(len(self._live), self.max_batch))
        return min(oldest + self.max_wait_s, earliest - predicted - self.margin_s)

    def launch_size(self) -> int:
        """How many frames the next batch takes: every waiting one (up to ``max_batch``),
        unless padding them up to their bucket costs more per frame than the largest bucket
        below, which then goes alone (the rest wait for the next batch). E.g. on the H100
        table 20 frames padded to 32 cost 3.5 ms each, 16 cost 2.4 ms each: 16 go; 30 padded
        to 32 cost 2.33 ms each: 30 go. A saturated GPU then spends no time on padding."""
        n = min(len(self._live), self.max_batch)
        if n <= 1:
            return n
        below = max(b for b in BUCKETS if b <= n)
        if below != n and self.cost(n) / n > self.cost(below) / below:
            return below
        return n

    def _top(self, heap: list[tuple[float, int]]) -> int:
        """The live seq at the top of ``heap``, dropping entries already taken (lazy delete)."""
        while heap[0][1] not in self._live:
            heapq.heappop(heap)
        return heap[0][1]

    def pop_batch(self) -> list[Any]:
        """:meth:`launch_size` items: those that waited ``max_wait_s`` (oldest first), then EDF."""
        out: list[Any] = []
        size = self.launch_size()
        while self._live and len(out) < size:
            seq = self._top(self._by_age)
            if self._live[seq].pushed + self.max_wait_s > self._now:
                break
            out.append(self._live.pop(seq).item)
        while self._live and len(out) < size:
            out.append(self._live.pop(self._top(self._by_due)).item)
        if len(self._by_due) + len(self._by_age) > 4 * len(self._live) + 64:
            self._rebuild()     # taken entries linger in the other heap: bound them
        return out

    def _rebuild(self) -> None:
        self._by_due = [(e.due, s) for s, e in self._live.items()]
        self._by_age = [(e.pushed, s) for s, e in self._live.items()]
        heapq.heapify(self._by_due)
        heapq.heapify(self._by_age)

    def drop(self, pred: Callable[[Any], bool]) -> list[Any]:
        """Remove the items matching ``pred`` (an interrupted or closed session's frames),
        in push order."""
        gone = [seq for seq, e in self._live.items() if pred(e.item)]
        out = [self._live.pop(seq).item for seq in gone]
        if gone:
            self._rebuild()
        return out


def admission_limit(cost: CostModel, max_batch: int, hop: int, fps: float = 25.0,
                    utilisation: float = 0.9) -> int:
    """Sessions the networks can serve in real time at ``fps`` frames each.

    A batch of ``b`` frames needs ``b / hop`` whisper windows; at best every launch is a full
    bucket, so ``b / (frames_s(b) + whisper_s(b // hop))`` frames a second, of which
    ``utilisation`` is planned (queueing delay grows without bound as the GPU nears 100 %).
    The best bucket up to ``max_batch`` decides.
    """
    if hop < 1 or fps <= 0 or not 0 < utilisation <= 1:
        raise ValueError("need hop >= 1, fps > 0 and 0 < utilisation <= 1")
    best = 0.0
    for b in cost.buckets:
        if b <= max_batch:
            per_s = b / (cost.frames_s(b) + cost.whisper_s(max(1, b // hop)))
            best = max(best, utilisation * per_s / fps)
    return math.floor(best + 1e-9)
