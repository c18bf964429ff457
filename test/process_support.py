"""A toy compute core for ``test/test_musetalk_process.py``, importable by a spawned child.

Spawn re-imports this module in the child (the factory is pickled by reference), so it imports
nothing heavy: no torch, no server. Each face of a job is filled with ``pcm[k] % 256``, so a face
in the wrong slot or from the wrong job shows. Results wait until the oldest pending job is
``delay_s`` old and then come back together, so jobs submitted close together share a step.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from websocket_service.errors import ModelNotFound


class ToyCore:
    def __init__(self, face_shape: tuple[int, ...], delay_s: float) -> None:
        self.face_shape, self.delay_s = face_shape, delay_s
        self.pending: list[tuple[float, int, list[int]]] = []  # (submitted, job, face values)
        self.fails: list[tuple[int, str]] = []
        self.batches: list[int] = []  # jobs per released batch
        self.hold = False
        self.broken = False

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "face_shape": self.face_shape}

    def control(self, method: str, args: tuple) -> Any:
        if method == "echo":
            return args
        if method == "hold":  # keep every result until released: a deterministic full queue
            self.hold = bool(args[0])
            return self.hold
        if method == "batches":
            return list(self.batches)
        if method == "raise":
            raise ValueError(args[0])
        if method == "missing":
            raise ModelNotFound(f"no avatar {args[0]}", {"avatar_id": args[0]})
        if method == "unpicklable":
            return lambda: None
        if method == "crash":
            os._exit(3)
        if method == "break_step":  # the next step raises: a bug in the core, not in one job
            self.broken = True
            return None
        raise ValueError(f"unknown control {method}")

    def submit(self, job_id: int, meta: dict[str, Any], pcm: np.ndarray) -> None:
        if meta.get("fail"):
            self.fails.append((job_id, f"toy failure of job {job_id}"))
            return
        if meta.get("reject"):
            raise KeyError(meta["reject"])
        # pcm is only valid during this call: keep the values, not the view
        values = [int(pcm[k]) % 256 for k in range(meta["frames"])]
        self.pending.append((time.monotonic(), job_id, values))

    def step(self, now: float) -> tuple[list[tuple[int, int, np.ndarray]], float]:
        if self.broken:
            raise RuntimeError("the toy core broke")
        if not self.pending or self.hold:
            return [], float("inf")
        release_at = self.pending[0][0] + self.delay_s
        if now < release_at:
            return [], release_at
        batch, self.pending = self.pending, []
        self.batches.append(len(batch))
        results = [(job_id, k, np.full(self.face_shape, v, np.uint8))
                   for _, job_id, values in batch for k, v in enumerate(values)]
        return results, float("inf")

    def failed(self) -> list[tuple[int, str]]:
        fails, self.fails = self.fails, []
        return fails


def make_toy_core(face_shape: tuple[int, ...] = (8, 8, 3), delay_s: float = 0.02) -> ToyCore:
    return ToyCore(face_shape, delay_s)


def broken_factory() -> ToyCore:
    raise ModelNotFound("no taesd folder", {"file": "/nowhere/taesd"}, fatal=True)
