"""A replaceable monotonic clock for pacing."""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Monotonic seconds and sleeping until an absolute deadline."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
