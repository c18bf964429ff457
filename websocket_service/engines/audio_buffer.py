"""Utterance buffering shared by engines: audio in, frame slots out.

Audio of a session arrives in arbitrary-length pieces. This module groups it into
utterances (closed by ``end``), and hands out frame slots in order as soon as each slot's
audio plus the engine's look-ahead is present. It keeps only a bounded history of samples
before the next slot, so a long utterance does not grow memory.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..units import SAMPLE_RATE, SAMPLES_PER_FRAME


@dataclass
class FrameSlot:
    utterance_id: int
    index: int
    pcm: np.ndarray  # the slot's own 640 samples (zero-padded past the end)
    last: bool
    arrival: float  # monotonic time the slot became ready
    audio_ms: int = 0  # where the slot starts in all the audio the buffer has received


class _Utterance:
    def __init__(self, uid: int, history: int, start: int) -> None:
        self.uid = uid
        self.start = start  # samples the buffer had received before this utterance
        self.history = history
        # samples[offset..] live in _store[:_len]: appended in place (capacity doubles), so a
        # 40 ms chunk costs its own copy, not a copy of all the history kept
        self._store = np.zeros(SAMPLES_PER_FRAME * 64, np.int16)
        self._len = 0
        self.offset = 0  # absolute sample index of samples[0]
        self.total = 0  # samples received so far
        self.ended = False
        self.next_index = 0
        self.arrivals: deque[tuple[int, float]] = deque()  # (total after push, time)

    @property
    def samples(self) -> np.ndarray:
        return self._store[: self._len]

    def push(self, pcm: np.ndarray, now: float) -> None:
        need = self._len + len(pcm)
        if need > len(self._store):
            grown = np.zeros(max(need, 2 * len(self._store)), np.int16)
            grown[: self._len] = self._store[: self._len]
            self._store = grown
        self._store[self._len: need] = pcm
        self._len = need
        self.total += len(pcm)
        self.arrivals.append((self.total, now))

    @property
    def n_frames(self) -> int | None:
        return math.ceil(self.total / SAMPLES_PER_FRAME) if self.ended else None

    def window(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) in utterance coordinates, zeros outside what exists."""
        out = np.zeros(end - start, np.int16)
        lo, hi = max(start, self.offset), min(end, self.offset + len(self.samples))
        if hi > lo:
            out[lo - start : hi - start] = self.samples[lo - self.offset : hi - self.offset]
        return out

    def trim(self) -> None:
        keep_from = self.next_index * SAMPLES_PER_FRAME - self.history
        cut = keep_from - self.offset
        if cut > 0:
            keep = self._len - cut
            self._store[:keep] = self._store[cut: self._len]  # memmove: overlapping is fine
            self._len = keep
            self.offset += cut
        while len(self.arrivals) > 1 and self.arrivals[1][0] <= self.next_index * SAMPLES_PER_FRAME:
            self.arrivals.popleft()

    def arrival_for(self, need: int, fallback: float) -> float:
        for total, t in self.arrivals:
            if total >= need:
                return t
        return fallback


class UtteranceBuffer:
    """Frame slots from a stream of audio, with ``lookahead`` frames of future audio each.

    ``history`` is how many samples before the next slot stay available to ``window``.
    """

    def __init__(self, lookahead_frames: int, clock: Callable[[], float],
                 history_samples: int = SAMPLE_RATE) -> None:
        self.lookahead = lookahead_frames
        self.history = history_samples
        self.clock = clock
        self._utts: deque[_Utterance] = deque()
        self._next_uid = 1
        self._end_time = 0.0
        self._received = 0

    # -- input
    def push(self, pcm: np.ndarray) -> None:
        if pcm.dtype != np.int16:
            raise TypeError("pcm must be int16")
        if len(pcm) == 0:
            return
        if not self._utts or self._utts[-1].ended:
            self._utts.append(_Utterance(self._next_uid, self.history, self._received))
            self._next_uid += 1
        self._utts[-1].push(pcm, self.clock())
        self._received += len(pcm)

    def end(self) -> None:
        if self._utts and not self._utts[-1].ended:
            self._utts[-1].ended = True
            self._end_time = self.clock()

    def clear(self) -> None:
        self._utts.clear()

    # -- state
    @property
    def open(self) -> bool:
        """An utterance is receiving audio (not ended)."""
        return bool(self._utts) and not self._utts[-1].ended

    def buffered_samples(self) -> int:
        return sum(u.total - u.next_index * SAMPLES_PER_FRAME for u in self._utts)

    def _ready_in(self, u: _Utterance) -> int:
        if u.ended:
            return (u.n_frames or 0) - u.next_index
        have = u.total // SAMPLES_PER_FRAME - self.lookahead
        return max(0, have - u.next_index)

    def ready_final(self) -> int:
        """Ready frames of utterances that have ended (no more audio will change them)."""
        n = 0
        for u in self._utts:
            if not u.ended:
                break
            n += self._ready_in(u)
        return n

    def ready(self) -> int:
        n = 0
        for u in self._utts:
            n += self._ready_in(u)
            if not u.ended:
                break
        return n

    # -- output
    def _drop_finished(self) -> None:
        while self._utts and self._utts[0].ended and self._ready_in(self._utts[0]) == 0:
            self._utts.popleft()

    def _current(self) -> _Utterance | None:
        for u in self._utts:
            if self._ready_in(u) > 0 or not u.ended:
                return u
        return None

    def take(self, max_frames: int) -> list[FrameSlot]:
        """Up to ``max_frames`` ready slots, in order; they are consumed.

        The audio around the returned slots stays readable through :meth:`window` until the
        next call of ``take``.
        """
        self._drop_finished()
        out: list[FrameSlot] = []
        while len(out) < max_frames:
            u = self._current()
            if u is None or self._ready_in(u) == 0:
                break
            n = u.next_index
            need = min(u.total, (n + 1 + self.lookahead) * SAMPLES_PER_FRAME)
            last = u.ended and n == (u.n_frames or 0) - 1
            fallback = self._end_time if u.ended else self.clock()
            out.append(FrameSlot(
                utterance_id=u.uid, index=n,
                pcm=u.window(n * SAMPLES_PER_FRAME, (n + 1) * SAMPLES_PER_FRAME),
                last=last, arrival=u.arrival_for(need, fallback),
                audio_ms=(u.start + n * SAMPLES_PER_FRAME) * 1000 // SAMPLE_RATE,
            ))
            u.next_index += 1
            u.trim()
        return out

    def received(self, utterance_id: int) -> tuple[int, bool]:
        """(samples received so far, ended) of a buffered utterance; (0, True) if gone."""
        for u in self._utts:
            if u.uid == utterance_id:
                return u.total, u.ended
        return 0, True

    def window(self, utterance_id: int, start: int, end: int) -> np.ndarray:
        """Samples [start, end) of an utterance still buffered (zeros outside it)."""
        for u in self._utts:
            if u.uid == utterance_id:
                return u.window(start, end)
        return np.zeros(end - start, np.int16)
