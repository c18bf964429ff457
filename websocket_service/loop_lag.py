"""How late the event loop wakes up: the figure that says whether frame pacing can be trusted.

A task asks to wake every ``period`` seconds and records how much later than asked it ran
(every callback on the loop delays every other: a blocking call shows here first). The last
``window`` samples give p50 / p99 / max in ``/health`` (``event_loop_lag_ms``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np


class LoopLag:
    def __init__(self, period: float = 0.02, window: int = 3000) -> None:
        self.period = period
        self._samples: deque[float] = deque(maxlen=window)  # seconds late
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # its CancelledError
            self._task = None

    async def _run(self) -> None:
        while True:
            asked = time.perf_counter() + self.period
            await asyncio.sleep(self.period)
            self._samples.append(max(0.0, time.perf_counter() - asked))

    def reset(self) -> None:
        self._samples.clear()

    def summary(self) -> dict[str, float | int]:
        """p50 / p99 / max milliseconds late over the window, and how many samples."""
        if not self._samples:
            return {"samples": 0}
        ms = np.fromiter(self._samples, float) * 1000
        return {"samples": len(ms), "p50": round(float(np.percentile(ms, 50)), 2),
                "p99": round(float(np.percentile(ms, 99)), 2), "max": round(float(ms.max()), 2)}
