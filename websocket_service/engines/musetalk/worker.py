"""The engine's single inference worker: one thread, one bounded queue, batches across sessions.

Streams submit requests (a few frames each: latents + audio tokens) and await a future. The
worker takes the first request, waits at most ``batch_wait_ms`` for more (from any session) until
``batch_max`` frames are gathered, runs UNet + VAE decode once for all of them, and resolves each
request's future with its uint8 faces.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import RateLimitExceeded

log = logging.getLogger(__name__)


@dataclass
class Request:
    session: int
    latents: torch.Tensor  # [n, 8, h, w] on the device
    audio: torch.Tensor  # [n, tokens, dim] float32 (positional encoding not yet added)
    future: Future = field(default_factory=Future)

    def __len__(self) -> int:
        return len(self.latents)


class InferenceWorker:
    """Batches UNet + VAE decode over every stream. Thread-safe ``submit``."""

    def __init__(self, unet, vae, pe: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 batch_max: int, batch_wait_ms: float, queue_frames: int) -> None:
        self.unet, self.vae = unet, vae
        self.pe = pe.to(device, dtype)
        self.device, self.dtype = device, dtype
        self.scale = float(vae.config.scaling_factor)
        self.batch_max = batch_max
        self.wait = batch_wait_ms / 1000.0
        self.queue_frames = queue_frames
        self._q: queue.Queue[Request | None] = queue.Queue()
        self._queued = 0  # frames waiting, bounded by queue_frames
        self._lock = threading.Lock()
        self._carry: Request | None = None
        self._stop = False
        self._stats = {"batches": 0, "frames": 0, "max_batch": 0, "sessions_per_batch_max": 0,
                       "busy_s": 0.0, "rejected": 0}
        self._recent: deque[tuple[int, float]] = deque(maxlen=50)  # (frames, seconds)
        self._thread = threading.Thread(target=self._run, name="musetalk-infer", daemon=True)
        self._thread.start()

    # -- client side
    def submit(self, req: Request) -> Future:
        """Queue a request; RateLimitExceeded when the queue already holds too many frames."""
        with self._lock:
            if self._stop:
                raise RuntimeError("inference worker is stopped")
            if self._queued + len(req) > self.queue_frames:
                self._stats["rejected"] += len(req)
                raise RateLimitExceeded(
                    "MuseTalk inference queue is full: generation is slower than real time",
                    {"queued_frames": self._queued, "limit": self.queue_frames})
            self._queued += len(req)
        self._q.put(req)
        return req.future

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = dict(self._stats)
            s["queued_frames"] = self._queued
            frames = sum(f for f, _ in self._recent)
            secs = sum(t for _, t in self._recent)
        s["fps_capacity"] = round(frames / secs, 2) if secs > 0 else 0.0
        # seconds of compute per second of 25 fps video: above 1.0 one stream cannot keep up
        s["realtime_factor"] = round(25.0 * secs / frames, 3) if frames else 0.0
        s["busy_s"] = round(s["busy_s"], 3)
        return s

    def close(self) -> None:
        with self._lock:
            self._stop = True
        self._q.put(None)
        self._thread.join(timeout=30)

    # -- worker side
    def _gather(self) -> list[Request] | None:
        first = self._carry or self._q.get()
        self._carry = None
        if first is None:
            return None
        batch, n = [first], len(first)
        deadline = time.monotonic() + self.wait
        while n < self.batch_max:
            left = deadline - time.monotonic()
            try:
                req = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self._q.put(None)
                break
            if n + len(req) > self.batch_max:
                self._carry = req  # first of the next batch
                break
            batch.append(req)
            n += len(req)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                break
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            t0 = time.perf_counter()
            try:
                faces = self._infer(live) if live else np.zeros((0,), np.uint8)
            except Exception as exc:  # report to every waiter; keep the worker alive
                log.exception("MuseTalk batch failed")
                for r in live:
                    r.future.set_exception(exc)
                faces = None
            dt = time.perf_counter() - t0
            with self._lock:
                self._queued -= sum(len(r) for r in batch)
                if live:
                    self._count(live, dt)
            if faces is not None:
                i = 0
                for r in live:
                    r.future.set_result(faces[i: i + len(r)])
                    i += len(r)
        for r in self._drain():
            r.future.cancel()

    def _drain(self) -> list[Request]:
        out = [self._carry] if self._carry else []
        while True:
            try:
                r = self._q.get_nowait()
            except queue.Empty:
                return out
            if r is not None:
                out.append(r)

    def _count(self, live: list[Request], dt: float) -> None:
        n = sum(len(r) for r in live)
        s = self._stats
        s["batches"] += 1
        s["frames"] += n
        s["max_batch"] = max(s["max_batch"], n)
        s["sessions_per_batch_max"] = max(s["sessions_per_batch_max"], len({r.session for r in live}))
        s["busy_s"] += dt
        self._recent.append((n, dt))

    @torch.inference_mode()
    def _infer(self, batch: list[Request]) -> np.ndarray:
        latents = torch.cat([r.latents for r in batch]).to(self.device, self.dtype)
        audio = torch.cat([r.audio for r in batch]).to(self.device, self.dtype) + self.pe
        t = torch.zeros((), device=self.device, dtype=torch.long)
        pred = self.unet(latents, t, encoder_hidden_states=audio).sample
        images = self.vae.decode(pred / self.scale).sample
        images = (images / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()
