"""The inference core: what runs next to the GPU, on one thread, in the inference process.

It owns the networks (or the GPU stand-in's waits), the avatars' latents and the schedule.
Sessions hand it *jobs*: one fixed-length audio window and the frames it serves (which avatar
frame each is drawn on, and when it is due). Each :meth:`MuseTalkCore.step`

1. encodes every window that arrived since the last step in **one** Whisper call (the windows
   all have one length, so they stack), and cuts each frame's audio tokens out of its window;
2. asks the :class:`~.schedule.DeadlineScheduler` whether to launch: a full bucket, a frame
   whose slack is down to the predicted batch time, or a short wait;
3. runs UNet + decoder once for the launched frames, padded to a batch-size bucket
   (:class:`~.graphs.BucketRunner`: one captured graph per bucket on CUDA), and returns faces.

With ``GPU_STANDIN`` set the three networks are replaced by waits of an H100's measured
per-batch costs (:mod:`.standin`) and the face is the avatar's own crop: everything else (the
log-mel, windows, schedule, process, shared memory, blending, encoding) is the real pipeline.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ModelNotFound
from .audio import WHISPER_HOP, WINDOW, LogMel, WhisperStates, frame_window, positional_encoding
from .graphs import BUCKETS, BucketRunner
from .schedule import CostModel, DeadlineScheduler, admission_limit
from .standin import StandIn

log = logging.getLogger(__name__)

CROP = 256  # MuseTalk's face crop (prep.CROP): the decoder's output side


@dataclass(frozen=True)
class CoreSpec:
    """Everything the inference process needs to build its core (picklable)."""

    model_path: str
    version: str
    device: str
    use_float16: bool
    decoder: str  # "sd-vae" | "taesd"
    graphs: str  # BucketRunner mode
    standin: str  # "" or a cost table name ("h100", "h100-taesd")
    batch_max: int
    batch_wait_ms: float
    hop: int
    whisper_window: str  # "short" | "full"
    window_samples: int
    utilisation: float = 0.95  # the admission's GPU-busy target


@dataclass
class _Frame:
    job: int
    k: int
    session: int
    avatar: str
    clip: str
    index: int
    due: float
    tokens: torch.Tensor | None


class _Lane:
    """One thread standing for the GPU's stream: work runs there in submission order while the
    core's thread goes on receiving, featurising, scheduling and copying faces out, as a CUDA
    launch returns at once and only the copy-out waits. ``free_at`` predicts when the queued
    work ends (from the cost model); the scheduler decides as of then."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._done: deque[tuple[str, Any, Any, float]] = deque()
        self.pending = 0
        self.free_at = 0.0
        self._thread = threading.Thread(target=self._run, name="inference-lane", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the lane and wait (start-up: graphs are captured where they replay)."""
        box: Future = Future()
        self._tasks.put(("call", box, fn, args))
        return box.result()

    def submit(self, kind: str, tag: Any, fn: Callable[..., Any], args: tuple, predicted_s: float,
               now: float) -> None:
        self.free_at = max(now, self.free_at) + predicted_s
        self.pending += 1
        self._tasks.put((kind, tag, fn, args))

    def collect(self) -> list[tuple[str, Any, Any, float]]:
        """Finished work: (kind, tag, result or the exception, seconds it ran)."""
        out = []
        while self._done:
            out.append(self._done.popleft())
        self.pending -= len(out)
        return out

    def close(self) -> None:
        self._tasks.put(None)

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            kind, tag, fn, args = task
            if kind == "call":
                try:
                    tag.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    tag.set_exception(exc)
                continue
            t0 = time.perf_counter()
            try:
                out = fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported with its jobs
                out = exc
            self._done.append((kind, tag, out, time.perf_counter() - t0))


def build_core(spec: CoreSpec, bundle: Any = None) -> MuseTalkCore:
    """The factory the inference process calls (module level, so it pickles); ``bundle``:
    models already in memory (an in-process runner only, e.g. the benchmark's)."""
    return MuseTalkCore(spec, bundle)


class MuseTalkCore:
    """Implements :class:`~.process.Core`. Not thread-safe: one thread calls everything."""

    def __init__(self, spec: CoreSpec, bundle: Any = None) -> None:
        t0 = time.perf_counter()
        self.spec = spec
        self.buckets = tuple(b for b in BUCKETS if b <= spec.batch_max) or (1,)
        self.avatars: dict[str, dict[str, Any]] = {}
        self._new: list[tuple[int, dict[str, Any], np.ndarray]] = []
        self._failed: list[tuple[int, str]] = []
        self._stats: dict[str, float] = {
            "batches": 0, "frames": 0, "max_batch": 0, "sessions_per_batch_max": 0,
            "busy_s": 0.0, "whisper_calls": 0, "whisper_windows": 0, "late_frames": 0}
        self._recent: deque[tuple[int, float]] = deque(maxlen=50)
        self.capture_s: dict[int, float] = {}
        self.files: dict[str, str] = {}  # what it loaded, for /health
        self.lane = _Lane()
        self._batches_in_flight = 0
        self._whisper_in_flight = False
        if spec.standin:
            self.cost = CostModel.from_table(spec.standin)
            self.standin: StandIn | None = StandIn(self.cost)
            self._load_standin()
        else:
            self.standin = None
            self._load_models(bundle)
        max_batch = self.buckets[-1]
        # margin: a Whisper call over a step's windows (~2-3 ms on an H100) may run just
        # before a launch
        self.scheduler = DeadlineScheduler(self.cost.frames_s, max_batch,
                                           spec.batch_wait_ms / 1000.0, margin_s=0.004)
        self.admission = admission_limit(self.cost, max_batch, spec.hop,
                                         utilisation=spec.utilisation)
        self.startup_s = round(time.perf_counter() - t0, 3)

    # -- loading
    def _load_standin(self) -> None:
        from transformers import WhisperFeatureExtractor  # noqa: PLC0415

        # the host side only (log-mel of a few windows): one thread, no OpenMP team spinning
        # against the server's media threads for the same cores
        torch.set_num_threads(1)
        fe = WhisperFeatureExtractor(feature_size=80)  # Whisper's defaults, built locally
        self.logmel = LogMel(fe.mel_filters, fe.n_fft, fe.hop_length, fe.n_samples,
                             torch.device("cpu"))
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def _load_models(self, bundle: Any) -> None:
        from . import loader  # noqa: PLC0415
        from .decoder import load_taesd, make_generate  # noqa: PLC0415

        s = self.spec
        root = Path(s.model_path)
        if bundle is not None:
            unet, vae, encoder = bundle.unet, bundle.vae, bundle.encoder
            wcfg, fe = bundle.whisper_config, bundle.feature_extractor
            device, dtype = bundle.device, bundle.dtype
            self.files = dict(bundle.files)
        else:
            if not root.is_dir():
                raise ModelNotFound(f"MuseTalk model folder (MODEL_PATH) not found: {root}",
                                    {"file": str(root)}, fatal=True)
            unet, f1 = loader.load_unet(root, s.version)
            vae, f2 = loader.load_vae(root)
            encoder, wcfg, fe, f3 = loader.load_whisper(root)
            self.files = {**f1, **f2, **f3}
            device = loader.pick_device(s.device)
            dtype = torch.float16 if (device.type == "cuda" and s.use_float16) else torch.float32
        decoder = vae
        if s.decoder == "taesd":
            decoder = load_taesd(root, device, dtype)
            self.files["taesd"] = str(root / "taesd")
        for m in (unet, decoder, encoder):
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.logmel = LogMel(fe.mel_filters, fe.n_fft, fe.hop_length, fe.n_samples, device)
        self.whisper = WhisperStates(encoder, self.logmel, s.whisper_window)
        if s.window_samples > self.whisper.max_frames * WHISPER_HOP:
            raise ModelNotFound(
                f"audio window of {s.window_samples} samples is longer than the Whisper "
                f"encoder's {self.whisper.max_frames} frames", {"file": str(root / "whisper")},
                fatal=True)
        d_model = int(wcfg.d_model)
        pe = positional_encoding(WINDOW * self.whisper.n_layers, d_model).to(device, dtype)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent_shape = (int(unet.config.in_channels), CROP // factor, CROP // factor)
        scale = float(decoder.config.scaling_factor)
        generate = make_generate(unet, decoder, pe, scale)
        self.runner = BucketRunner(generate, latent_shape, (WINDOW * self.whisper.n_layers, d_model),
                                   device, dtype, s.graphs, self.buckets)
        self.capture_s = self.lane.call(self.runner.warm_up)
        self.cost = CostModel.measured(self.lane.call(self.runner.measure, 3),
                                       self.lane.call(self._whisper_times))

    def _whisper_times(self) -> dict[int, float]:
        """Seconds of one encoder call over 1 window and over a full step's windows: the
        scheduler's and the admission's first estimates (median of 3)."""
        out = {}
        for n in sorted({1, max(1, self.buckets[-1] // self.spec.hop)}):
            pcm = np.zeros((n, self.spec.window_samples), np.int16)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                with torch.inference_mode():
                    self.whisper.batch(pcm)
                times.append(time.perf_counter() - t)
            out[n] = sorted(times)[1]
        return out

    # -- the Core protocol
    def info(self) -> dict[str, Any]:
        return {"startup_s": self.startup_s, "gpu_standin": self.spec.standin or None,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "buckets": list(self.buckets), "admission_limit": self.admission,
                "graphs": getattr(getattr(self, "runner", None), "mode", "stand-in"),
                "capture_s": {str(k): round(v, 3) for k, v in self.capture_s.items()},
                "decoder": self.spec.decoder, "files": self.files}

    def close(self) -> None:
        """Stop the lane's thread (the loop calls it when it stops)."""
        self.lane.close()

    def control(self, method: str, args: tuple) -> Any:
        if method == "add_avatar":
            key, payload = args
            self.avatars[key] = self._place(payload)
            return len(self.avatars)
        if method == "drop_avatar":
            return self.avatars.pop(args[0], None) is not None
        if method == "drop_session":
            return self._drop_session(int(args[0]))
        if method == "stats":
            return self.stats()
        raise ValueError(f"unknown control {method!r}")

    def _place(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Latents to the device once (real networks); the reference faces (stand-in)."""
        if self.standin is not None:
            return {n: np.ascontiguousarray(f) for n, f in payload["faces"].items()}
        return {n: t.to(self.device, self.dtype) for n, t in payload["latents"].items()}

    def submit(self, job_id: int, meta: dict[str, Any], pcm: np.ndarray) -> None:
        self._new.append((job_id, meta, np.array(pcm, copy=True)))
        if self.standin is not None:  # the real log-mel, while the lane is busy
            self.logmel(torch.as_tensor(self._new[-1][2].astype(np.float32) / 32768.0))

    def failed(self) -> list[tuple[int, str]]:
        out, self._failed = self._failed, []
        return out

    def step(self, now: float) -> tuple[list[tuple[int, int, np.ndarray]], float]:
        results = self._collect()
        # the lane alternates: one encoder call over every window that came during a batch,
        # then the next batch (which can then include those windows' frames)
        if self._new and not self._whisper_in_flight and not self._batches_in_flight:
            self._featurize(now)
        self._launch(now)
        lane = self.lane
        if lane.pending:  # look again when the lane should be done (then every 0.5 ms)
            return results, max(now + 0.0005, lane.free_at)
        wake = self.scheduler.decide(now) if len(self.scheduler) else math.inf
        return results, now if wake is None else wake

    def _launch(self, now: float) -> None:
        """Hand the next batch to the lane when it is free (no batch or encoder call on it) and
        the launch rule holds. Deciding only then puts every frame whose tokens came back in the
        batch: a batch queued behind a running one would go out part-empty (a bucket costs the
        same full or not), and under load that loses throughput when it is needed most."""
        if self._batches_in_flight or self._whisper_in_flight or not len(self.scheduler):
            return
        if self.scheduler.decide(now) is not None:
            return
        frames: list[_Frame] = self.scheduler.pop_batch()
        self._batches_in_flight += 1
        self.lane.submit("frames", frames, self._generate, (frames,),
                         self.cost.frames_s(len(frames)), now)

    def _collect(self) -> list[tuple[int, int, np.ndarray]]:
        out: list[tuple[int, int, np.ndarray]] = []
        for kind, tag, result, dt in self.lane.collect():
            if kind == "whisper":
                self._whisper_in_flight = False
                jobs, t_pushed = tag
                if isinstance(result, Exception):
                    self._fail_jobs([j for j, _, _ in jobs], result)
                else:
                    self._schedule(jobs, result, t_pushed)
                continue
            self._batches_in_flight -= 1
            frames = tag
            if isinstance(result, Exception):
                self._fail_jobs(sorted({f.job for f in frames}), result)
                continue
            if self.standin is None:
                self.cost.observe(len(frames), dt)
            self._count(frames, dt, time.monotonic())
            out.extend((f.job, f.k, face) for f, face in zip(frames, result, strict=True))
        return out

    def _fail_jobs(self, jobs: list[int], exc: Exception) -> None:
        log.error("MuseTalk inference failed: %s", exc, exc_info=exc)
        msg = f"inference failed: {exc}"[:300]
        self._failed.extend((j, msg) for j in jobs)

    # -- work
    def _featurize(self, now: float) -> None:
        """Every new window to the lane in one encoder call; its frames are scheduled when the
        tokens are back. One call at a time: windows that come meanwhile wait for the next, so
        that there is about one call per batch, not one per message."""
        jobs, self._new = self._new, []
        known = [j for j in jobs if j[1]["avatar"] in self.avatars]
        for job_id, meta, _ in jobs:
            if meta["avatar"] not in self.avatars:
                self._failed.append((job_id, f"avatar {meta['avatar']!r} is not loaded"))
        if not known:
            return
        pcm = np.stack([p for _, _, p in known])
        self._stats["whisper_calls"] += 1
        self._stats["whisper_windows"] += len(pcm)
        self._whisper_in_flight = True
        self.lane.submit("whisper", (known, now), self._encode, (pcm,),
                         self.cost.whisper_s(len(pcm)), now)

    def _schedule(self, jobs: list[tuple[int, dict[str, Any], np.ndarray]],
                  tokens: torch.Tensor | None, now: float) -> None:
        # a job of a session dropped while its window was on the lane still renders: its
        # faces come back to a stream that has moved on, which ignores them
        for row, (job_id, meta, _) in enumerate(jobs):
            for k, (f, clip, index, due) in enumerate(meta["frames"]):
                tok = None if tokens is None else frame_window(
                    tokens[row], int(f), int(meta["offset"]), meta["n_valid"])
                frame = _Frame(job_id, k, int(meta["session"]), meta["avatar"], clip, int(index),
                               float(due), tok)
                self.scheduler.push(frame.due, frame, now)

    def _encode(self, pcm: np.ndarray) -> torch.Tensor | None:
        """On the lane: the encoder over every window (the stand-in: its wait)."""
        if self.standin is not None:
            self.standin.whisper(len(pcm))
            return None
        with torch.no_grad():
            return self.whisper.batch(pcm)

    def _generate(self, frames: list[_Frame]) -> np.ndarray:
        if self.standin is not None:
            faces = np.stack([self.avatars[f.avatar][f.clip][f.index] for f in frames])
            return self.standin.frames(faces)
        # no inference_mode: the runner replays graphs in the grad mode they were captured in
        with torch.no_grad():
            lat = torch.stack([self.avatars[f.avatar][f.clip][f.index] for f in frames])
            aud = torch.stack([f.tokens for f in frames]).to(self.device, self.dtype)
        return self.runner.run(lat, aud)

    def _drop_session(self, session: int) -> int:
        dropped = self.scheduler.drop(lambda f: f.session == session)
        jobs = {f.job for f in dropped}
        keep = []
        for job in self._new:
            if int(job[1]["session"]) == session:
                jobs.add(job[0])
            else:
                keep.append(job)
        self._new = keep
        self._failed.extend((j, "interrupted") for j in sorted(jobs))
        return len(jobs)

    # -- figures
    def _count(self, frames: list[_Frame], dt: float, done: float) -> None:
        s = self._stats
        n = len(frames)
        s["batches"] += 1
        s["frames"] += n
        s["max_batch"] = max(s["max_batch"], n)
        s["sessions_per_batch_max"] = max(s["sessions_per_batch_max"],
                                          len({f.session for f in frames}))
        s["busy_s"] += dt
        s["late_frames"] += sum(done > f.due for f in frames)
        self._recent.append((n, dt))

    def stats(self) -> dict[str, float]:
        s = dict(self._stats)
        frames = sum(f for f, _ in self._recent)
        secs = sum(t for _, t in self._recent)
        s["queued_frames"] = len(self.scheduler)
        s["fps_capacity"] = round(frames / secs, 2) if secs > 0 else 0.0
        # seconds of compute per second of 25 fps video: above 1.0 one stream cannot keep up
        s["realtime_factor"] = round(25.0 * secs / frames, 3) if frames else 0.0
        s["busy_s"] = round(s["busy_s"], 3)
        return s

