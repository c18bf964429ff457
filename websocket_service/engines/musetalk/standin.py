"""The GPU stand-in (``GPU_STANDIN=h100``): the three networks replaced by waits.

It exists to prove the host side (log-mel, windows, scheduler, inference process, shared memory,
blending, encoding, playout) at full load on a machine without a GPU, and for capacity planning:
every whisper-encoder call, every UNet batch and every decoder chunk takes the time the cost
table gives for its size, and the core returns the avatar's own face crops (the reference face), so nothing
here is inference. ``/health`` reports it so it is never mistaken for the real engine.

The wait is a ``sleep``: like a host thread blocked on a CUDA event, it releases the GIL, so
the rest of the process runs during a "batch" as it would during a real one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .schedule import CostModel


class StandIn:
    """Waits of ``cost``'s per-batch times in place of the whisper encoder, UNet and decoder.

    ``sleep`` is injectable so tests can record the waits instead of spending them.
    """

    def __init__(self, cost: CostModel, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cost = cost
        self._sleep = sleep

    def whisper(self, n_windows: int) -> None:
        """One encoder call over ``n_windows`` windows: waits ``whisper_s(n_windows)``."""
        if n_windows < 0:
            raise ValueError(f"n_windows must be >= 0, got {n_windows}")
        if n_windows:
            self._sleep(self.cost.whisper_s(n_windows))

    def wait_unet(self, n: int) -> None:
        """The once-per-batch part (the UNet) of a batch of ``n`` frames: its wait only (the
        caller gathers the faces off the GPU's timeline, as a real batch's copy-out overlaps
        the next one)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n:
            self._sleep(self.cost.unet_s(n))

    def wait_chunk(self, c: int, n: int) -> None:
        """One decoder chunk of ``c`` frames of a batch of ``n``: its wait only."""
        if not 0 <= c <= n:
            raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
        if c:
            self._sleep(self.cost.chunk_s(c, n))
