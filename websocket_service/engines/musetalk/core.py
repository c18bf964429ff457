"""The inference core: what runs next to the GPU, on one thread, in the inference process.

It owns the networks (or the GPU stand-in's waits), the avatars' latents and the schedule.
Sessions hand it *jobs*: one fixed-length audio window and the frames it serves (which avatar
frame each is drawn on, and when it is due). Each :meth:`MuseTalkCore.step`

1. encodes every window that arrived since the last step in **one** Whisper call (the windows
   all have one length, so they stack), and cuts each frame's audio tokens out of its window;
2. asks the :class:`~.schedule.DeadlineScheduler` whether to launch: a full bucket, a frame
   whose slack is down to the predicted batch time, or a short wait;
3. runs the UNet once for the launched frames, padded to a batch-size bucket
   (:class:`~.graphs.BucketRunner`: one captured graph per bucket on CUDA), then the decoder
   over chunks of ``decode_chunk`` frames, earliest due first, and hands each chunk's faces back
   as soon as it is decoded (the rest of the batch is still decoding).

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ...errors import ModelNotFound
from .audio import WHISPER_HOP, WINDOW, LogMel, WhisperStates, frame_window, positional_encoding
from .graphs import BUCKETS, BucketRunner, GraphMode, chunk_sizes
from .schedule import CostModel, DeadlineScheduler, admission_limit
from .standin import StandIn

log = logging.getLogger(__name__)

CROP = 256  # MuseTalk's face crop (prep.CROP): the decoder's output side
#: windows the stand-in's log-mel takes at once (one torch call per window cost ~2.5x the CPU
#: of one per 8: 0.59 ms a window against 0.23 on this 2-core machine)
STANDIN_MEL_BATCH = 8


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
    decode_chunk: int = 0  # frames per decoder call (0: the whole batch in one call)


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
    """The thread that stands for the GPU's stream. At start-up it runs calls (graphs are
    captured on the thread that replays them), then :meth:`MuseTalkCore._drive` for good."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference-lane", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the lane and wait for its result."""
        box: Future = Future()
        self._tasks.put((box, fn, args))
        return box.result()

    def start(self, fn: Callable[[], None]) -> None:
        """Hand the lane its loop (it returns when the core closes)."""
        self._tasks.put((None, fn, ()))

    def close(self) -> None:
        self._tasks.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)  # not left running into the interpreter's exit

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            box, fn, args = task
            if box is None:
                fn()
                return
            try:
                box.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.set_exception(exc)


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
        self._mel: list[np.ndarray] = []  # the stand-in's windows not through the log-mel yet
        self._failed: list[tuple[int, str]] = []
        self._stats: dict[str, float] = {
            "batches": 0, "frames": 0, "max_batch": 0, "sessions_per_batch_max": 0,
            "busy_s": 0.0, "whisper_calls": 0, "whisper_windows": 0, "late_frames": 0}
        self._recent: deque[tuple[int, float]] = deque(maxlen=50)
        self.capture_s: dict[int, float] = {}
        self.files: dict[str, str] = {}  # what it loaded, for /health
        self.lane = _Lane()
        # the lane drives itself (encoder call, then batch, as soon as the last one ends): the
        # core's thread, which receives jobs and copies faces out, is off that critical path.
        # Everything below is shared between the two threads under this condition's lock.
        self._cv = threading.Condition()
        self._done: list[tuple[list[_Frame], Any]] = []  # decoded chunks: frames, faces
        self._busy_until = 0.0  # the running chunk's predicted end (math.inf: none running)
        self._idle_until = math.inf  # when an idle lane next looks at the schedule
        self._closing = False
        if spec.standin:
            self.cost = CostModel.from_table(spec.standin, spec.decode_chunk)
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
        self.lane.start(self._drive)

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
        from .decoder import load_taesd, make_decode, make_unet  # noqa: PLC0415

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
        mode = cast(GraphMode, s.graphs)
        audio_shape = (WINDOW * self.whisper.n_layers, d_model)
        pred_shape = (int(unet.config.out_channels), *latent_shape[1:])
        # the UNet's latents stay on the device; the decoder reads them chunk by chunk
        self.runner = BucketRunner(make_unet(unet, pe, scale), (latent_shape, audio_shape),
                                   device, dtype, mode, self.buckets, to_host=False)
        decode_buckets = tuple(b for b in self.buckets
                               if not s.decode_chunk or b <= s.decode_chunk) or (1,)
        self.decode_runner = BucketRunner(make_decode(decoder), (pred_shape,), device, dtype,
                                          mode, decode_buckets)
        unet_capture = self.lane.call(self.runner.warm_up)
        dec_capture = self.lane.call(self.decode_runner.warm_up)
        self.capture_s = {b: unet_capture[b] + dec_capture.get(b, 0.0) for b in self.buckets}
        self.cost = CostModel.measured(self.lane.call(self.runner.measure, 3),
                                       self.lane.call(self._whisper_times),
                                       decoder=self.lane.call(self.decode_runner.measure, 3),
                                       chunk=s.decode_chunk)

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
                "decoder": self.spec.decoder, "decode_chunk": self.spec.decode_chunk,
                "files": self.files}

    def close(self) -> None:
        """Stop the lane's thread (the loop calls it when it stops)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self.lane.close()

    def control(self, method: str, args: tuple) -> Any:
        if method == "add_avatar":
            key, payload = args
            placed = self._place(payload)
            with self._cv:
                self.avatars[key] = placed
                return len(self.avatars)
        if method == "drop_avatar":
            with self._cv:
                return self.avatars.pop(args[0], None) is not None
        if method == "drop_session":
            with self._cv:
                return self._drop_session(int(args[0]))
        if method == "stats":
            with self._cv:
                return self.stats()
        raise ValueError(f"unknown control {method!r}")

    def _place(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Latents to the device once (real networks); the reference faces (stand-in)."""
        if self.standin is not None:
            return {n: np.ascontiguousarray(f) for n, f in payload["faces"].items()}
        return {n: t.to(self.device, self.dtype) for n, t in payload["latents"].items()}

    def submit(self, job_id: int, meta: dict[str, Any], pcm: np.ndarray) -> None:
        pcm = np.array(pcm, copy=True)
        with self._cv:
            self._new.append((job_id, meta, pcm))
            self._cv.notify()
        if self.standin is not None:
            # the real log-mel (its cost on the host; the real engine runs it on the device),
            # on this thread while the lane is busy, never on the lane: CPU work there is late
            # whenever the cores are busy, and so is every batch behind it
            self._mel.append(pcm)
            if len(self._mel) >= STANDIN_MEL_BATCH:
                windows, self._mel = np.stack(self._mel), []
                self.logmel(torch.as_tensor(windows.astype(np.float32) / 32768.0))

    def failed(self) -> list[tuple[int, str]]:
        with self._cv:
            out, self._failed = self._failed, []
        return out

    def step(self, now: float) -> tuple[list[tuple[int, int, np.ndarray]], float]:
        """The core's thread: hand back the faces of decoded chunks; come back when the
        running chunk should end (then every half millisecond until it has)."""
        with self._cv:
            done, self._done = self._done, []
            busy_until = self._busy_until
            if busy_until == math.inf and (self._new or len(self.scheduler)):
                # the lane has work it has not started: a batch waiting for its launch time
                # (then its first chunk's predicted end), or windows it has not woken up for yet
                waiting = min(len(self.scheduler), self.scheduler.max_batch)
                busy_until = self._idle_until + (self.cost.first_s(waiting) if waiting else 0.0)
                if self._new or busy_until == math.inf:
                    busy_until = now
        out: list[tuple[int, int, np.ndarray]] = []
        for frames, faces in done:
            if faces is None:  # the stand-in: the avatar's own crops (copied into the slots)
                faces = [self.avatars[f.avatar][f.clip][f.index] for f in frames]
            out.extend((f.job, f.k, face) for f, face in zip(frames, faces, strict=True))
        if busy_until == math.inf:
            return out, math.inf
        return out, max(busy_until, now + 0.0005)

    # -- the lane
    def _drive(self) -> None:
        """The lane's loop: one encoder call over every window that came during the last batch
        (so about one call per batch, not one per job), then the next batch when the launch
        rule holds, then again. Deciding only when the lane is free puts every frame whose
        tokens are back in the batch: a batch queued behind a running one would go out
        part-empty (a bucket costs the same full or not), losing throughput under load."""
        last_was_encoder = False
        while True:
            with self._cv:
                work = self._next_work(last_was_encoder)
                if work is None:
                    return
            kind, arg = work
            last_was_encoder = kind == "whisper"
            if kind == "whisper":
                self._run_encoder(arg)
            else:
                self._run_batch(arg)

    def _next_work(self, prefer_batch: bool) -> tuple[str, Any] | None:
        """Under the lock: wait for the next thing the lane should do (None: closing)."""
        while not self._closing:
            now = time.monotonic()
            wake = math.inf
            if len(self.scheduler):
                decision = self.scheduler.decide(now)
                if decision is None and (prefer_batch or not self._new):
                    frames: list[_Frame] = self.scheduler.pop_batch()
                    self._busy_until = now + self.cost.first_s(len(frames))
                    return "frames", frames
                wake = now if decision is None else decision
            if self._new:
                jobs, self._new = self._new, []
                self._busy_until = now + self.cost.whisper_s(len(jobs))
                return "whisper", jobs
            self._busy_until, self._idle_until = math.inf, wake
            self._cv.wait(None if wake == math.inf else max(0.0, wake - now))
            prefer_batch = False
        return None

    def _run_encoder(self, jobs: list[tuple[int, dict[str, Any], np.ndarray]]) -> None:
        known = [j for j in jobs if j[1]["avatar"] in self.avatars]
        try:
            tokens = self._encode(np.stack([p for _, _, p in known])) if known else None
        except Exception as exc:  # noqa: BLE001 - fails these jobs, the lane goes on
            with self._cv:
                self._fail_jobs([j for j, _, _ in known], exc)
            return
        with self._cv:
            for job_id, meta, _ in jobs:
                if meta["avatar"] not in self.avatars:
                    self._failed.append((job_id, f"avatar {meta['avatar']!r} is not loaded"))
            self._stats["whisper_calls"] += 1
            self._stats["whisper_windows"] += len(known)
            self._schedule(known, tokens, time.monotonic())

    def _run_batch(self, frames: list[_Frame]) -> None:
        """One batch: each decoded chunk goes to the core's thread at once (its faces are sent
        back while the next chunk decodes); a failure fails the jobs not yet handed back."""
        t0 = time.perf_counter()
        n, handed = len(frames), 0
        try:
            for part, faces in self._generate(frames):
                now = time.monotonic()
                with self._cv:
                    handed += len(part)
                    self._done.append((part, faces))
                    self._stats["late_frames"] += sum(now > f.due for f in part)
                    rest = chunk_sizes(n - handed, self.spec.decode_chunk)
                    self._busy_until = now + (self.cost.chunk_s(rest[0], n) if rest else 0.0)
        except Exception as exc:  # noqa: BLE001 - fails these jobs, the lane goes on
            with self._cv:
                self._fail_jobs(sorted({f.job for f in frames[handed:]}), exc)
            return
        dt = time.perf_counter() - t0
        with self._cv:
            if self.standin is None:
                self.cost.observe(n, dt)
            self._count(frames, dt)

    def _fail_jobs(self, jobs: list[int], exc: Exception) -> None:
        log.error("MuseTalk inference failed: %s", exc, exc_info=exc)
        msg = f"inference failed: {exc}"[:300]
        self._failed.extend((j, msg) for j in jobs)

    def _schedule(self, jobs: list[tuple[int, dict[str, Any], np.ndarray]],
                  tokens: torch.Tensor | None, now: float) -> None:
        # a job of a session dropped while its window was on the lane still renders: its
        # faces come back to a stream that has moved on, which ignores them
        # a job's frames share its first frame's due time: adjacent in the EDF order, so a
        # batch boundary splits at most one job, not every job whose frames' dues straddle it
        # (the job comes back whole: its first face would wait for the next batch)
        for row, (job_id, meta, _) in enumerate(jobs):
            due = min(float(fr[3]) for fr in meta["frames"])
            for k, (f, clip, index, _due) in enumerate(meta["frames"]):
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

    def _generate(self, frames: list[_Frame]) -> Iterator[tuple[list[_Frame], np.ndarray | None]]:
        """On the lane: one batch, the UNet once and then the decoder chunk by chunk, each
        chunk's frames and faces as soon as they are on the host (the stand-in: its waits, and
        no faces: they are gathered after)."""
        n = len(frames)
        sizes = chunk_sizes(n, self.spec.decode_chunk)
        if self.standin is not None:
            self.standin.wait_unet(n)
            at = 0
            for c in sizes:
                self.standin.wait_chunk(c, n)
                yield frames[at:at + c], None
                at += c
            return
        # no inference_mode: the runners replay graphs in the grad mode they were captured in
        with torch.no_grad():
            lat = torch.stack([self.avatars[f.avatar][f.clip][f.index] for f in frames])
            aud = torch.stack([f.tokens for f in frames if f.tokens is not None])
            pred = self.runner.run(lat, aud.to(self.device, self.dtype))
            at = 0
            for c in sizes:
                faces = self.decode_runner.run(pred[at:at + c])
                yield frames[at:at + c], faces
                at += c

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
    def _count(self, frames: list[_Frame], dt: float) -> None:
        s = self._stats
        n = len(frames)
        s["batches"] += 1
        s["frames"] += n
        s["max_batch"] = max(s["max_batch"], n)
        s["sessions_per_batch_max"] = max(s["sessions_per_batch_max"],
                                          len({f.session for f in frames}))
        s["busy_s"] += dt
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

