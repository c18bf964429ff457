"""The MuseTalk engine: prepares avatars here and runs inference in its own process.

The inference process (:mod:`.process`) owns the networks, the avatars' latents and the
schedule (:mod:`.core`); this side keeps what the sessions need to blend faces into their
frames (crop boxes and masks), and the VAE encoder and face parser that prepare avatars.
``GPU_STANDIN`` replaces the three networks with an H100's measured waits (:mod:`.standin`):
no model files are read, and ``/health`` says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...avatars.model import Avatar
from ...config import Settings
from ...errors import ModelNotFound, ProcessingError, RateLimitExceeded
from ..base import LipSyncEngine, LipSyncStream, ProgressFn
from . import prep
from .audio import AUDIO_LOOKAHEAD_FRAMES, fixed_window_samples
from .core import CoreSpec, build_core
from .loader import Bundle, load_parsing, load_vae, pick_device
from .prep import ClipData
from .process import InferenceProcess, Runner, ThreadRunner
from .stream import BaseI420, MuseTalkStream, ReadyLatency, StreamDeps

log = logging.getLogger(__name__)
DEFAULT_HOP = Settings.model_fields["musetalk_hop_frames"].default
WHISPER_SAMPLES = 480_000  # Whisper's 30 s: the longest window any encoder takes
STATS_EVERY_S = 1.0


class MuseTalkEngine(LipSyncEngine):
    """MuseTalk v1.5 / v1.0 on diffusers + transformers: single-step latent inpainting per frame."""

    name = "musetalk"
    #: the window reaches 3 frames past a frame's slot, and a window is sent once per hop
    lookahead_frames = AUDIO_LOOKAHEAD_FRAMES + DEFAULT_HOP - 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = settings.musetalk_version
        self.hop = settings.musetalk_hop_frames
        self.lookahead_frames = AUDIO_LOOKAHEAD_FRAMES + self.hop - 1
        self.standin = settings.gpu_standin
        context = settings.musetalk_audio_context_ms * 16
        self.window_samples = fixed_window_samples(context, self.hop, WHISPER_SAMPLES)
        self.bundle: Bundle | None = None  # in-memory models handed to attach()
        self.vae: Any = None  # the VAE that encodes avatar crops (none in the stand-in)
        self.parsing: Any = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.files: dict[str, str] = {}
        self.warnings: list[str] = []
        self.runner: Runner | None = None
        self.core_info: dict[str, Any] = {}
        self._streams = 0
        self._avatars: dict[str, dict[str, Any]] = {}  # key -> what the core holds (re-sent)
        self._stats: dict[str, Any] = {}
        self._stats_at = 0.0
        self._stats_call: Any = None
        self._prep_lock = threading.Lock()
        self._ready = ReadyLatency()

    # -- loading
    def load(self) -> None:
        """Start the inference process on the model files (or the stand-in); the avatar
        preparation models (VAE, face parser) load here."""
        s = self.settings
        if not self.standin:
            root = Path(s.model_path)
            if not root.is_dir():
                raise ModelNotFound(f"MuseTalk model folder (MODEL_PATH) not found: {root}",
                                    {"file": str(root)}, fatal=True)
            self.device = pick_device(s.device)
            self.dtype = torch.float16 if (self.device.type == "cuda" and s.use_float16) \
                else torch.float32
            vae, files = load_vae(root)
            self.vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)
            self.parsing, f2, self.warnings = load_parsing(root)
            if self.parsing is not None:
                self.parsing.to(self.device).eval().requires_grad_(False)
            self.files = {**files, **f2}
        self._start(functools.partial(build_core, self._spec()), in_process=not s.musetalk_process)

    def attach(self, b: Bundle) -> None:
        """Start on already-built models (the benchmark's in-memory ones), in this process."""
        self.bundle = b
        self.vae, self.parsing, self.device, self.dtype = b.vae, b.parsing, b.device, b.dtype
        self.files, self.warnings = dict(b.files), list(b.warnings)
        self._start(functools.partial(build_core, self._spec(), b), in_process=True)

    def _spec(self) -> CoreSpec:
        s = self.settings
        return CoreSpec(str(Path(s.model_path).resolve()), self.version, s.device, s.use_float16,
                        s.musetalk_decoder, s.musetalk_graphs, self.standin, s.batch_max,
                        s.batch_wait_ms, self.hop, s.musetalk_whisper_window, self.window_samples,
                        s.musetalk_gpu_utilisation, s.musetalk_decode_chunk)

    def _start(self, factory: Callable[[], Any], in_process: bool) -> None:
        shape = (prep.CROP, prep.CROP, 3)
        slots = self.settings.musetalk_queue_frames
        if in_process:
            runner: Runner = ThreadRunner(factory, face_shape=shape,
                                          window_samples=self.window_samples, slots=slots)
        else:
            runner = InferenceProcess(factory, face_shape=shape, window_samples=self.window_samples,
                                      slots=slots, on_crash=self._crashed,
                                      on_restart=self._restarted)
        self.core_info = runner.start()
        self.runner = runner
        log.info("MuseTalk %s: inference %s on %s (%s), decoder %s, graphs %s, started in %.1f s%s",
                 self.version, "in this process" if in_process else "process",
                 self.core_info.get("device"), self.core_info.get("dtype"),
                 self.settings.musetalk_decoder, self.core_info.get("graphs"),
                 self.core_info.get("startup_s", 0.0),
                 f"; GPU STAND-IN {self.standin!r}: no inference" if self.standin else "")

    def _crashed(self, reason: str) -> None:
        log.error("MuseTalk inference process stopped (%s); restarting", reason)

    def _restarted(self) -> None:
        """A new inference process: give it every prepared avatar again."""
        runner = self.runner
        if runner is None:
            return
        self.core_info = dict(getattr(runner, "info", None) or self.core_info)
        for key, payload in list(self._avatars.items()):
            runner.control("add_avatar", key, payload)
        log.info("MuseTalk inference process restarted with %d avatars", len(self._avatars))

    @property
    def mask_kind(self) -> str:
        if self.parsing is not None:
            return "face-parsing"
        if self.warnings:
            return "geometric (face-parse-bisent/79999_iter.pth did not load)"
        return "geometric (face-parse-bisent/79999_iter.pth not found)"

    @property
    def admission_limit(self) -> int:
        """Sessions admitted at once: MUSETALK_MAX_STREAMS, else what the measured (or stand-in)
        per-batch costs serve in real time, at least 1."""
        return self.settings.musetalk_max_streams or max(1, int(
            self.core_info.get("admission_limit", 1)))

    def info(self) -> dict[str, Any]:
        runner = self.runner
        out: dict[str, Any] = {"name": self.name, "loaded": runner is not None,
                               "device": self.core_info.get("device", "none"),
                               "version": self.version,
                               "gpu_standin": self.standin or None}
        if runner is None:
            return out
        out.update({"dtype": self.core_info.get("dtype"),
                    "files": {**self.core_info.get("files", {}), **self.files},
                    "warnings": self.warnings, "mask": self.mask_kind, "hop_frames": self.hop,
                    "lookahead_ms": 40 * self.lookahead_frames,
                    "whisper_window": self.settings.musetalk_whisper_window,
                    "window_ms": self.window_samples // 16,
                    "decoder": self.settings.musetalk_decoder,
                    "decode_chunk": self.core_info.get("decode_chunk"),
                    "graphs": self.core_info.get("graphs"),
                    "buckets": self.core_info.get("buckets"),
                    "startup_s": self.core_info.get("startup_s"),
                    "capture_s": self.core_info.get("capture_s"),
                    "batch_max": self.settings.batch_max,
                    "streams": self._streams, "admission_limit": self.admission_limit,
                    "speech_delay_ms": round(1000 * self._ready.delay(), 1),
                    "inference_process": {"alive": bool(getattr(runner, "alive", True)),
                                          "gc_frozen_objects":
                                              self.core_info.get("gc_frozen_objects"),
                                          "restarts": int(getattr(runner, "restarts", 0)),
                                          "separate": isinstance(runner, InferenceProcess)},
                    "stats": self.stats()})
        return out

    def stats(self) -> dict[str, Any]:
        """Batching counters from the inference core (refreshed in the background, at most
        once a second: never a blocking call on the event loop)."""
        runner = self.runner
        now = time.monotonic()
        if runner is not None and self._stats_call is None and now - self._stats_at >= STATS_EVERY_S:
            self._stats_at = now
            try:
                call = runner.control("stats")
            except Exception:  # noqa: BLE001 - no core right now (restarting): keep the last
                return dict(self._stats)
            self._stats_call = call
            call.add_done_callback(self._got_stats)
        return dict(self._stats)

    def _got_stats(self, call: Any) -> None:
        self._stats_call = None
        if not call.cancelled() and call.exception() is None:
            self._stats = call.result()

    def stats_now(self, timeout: float = 30.0) -> dict[str, Any]:
        """The core's counters now (blocking: tests and benchmarks, never the event loop)."""
        assert self.runner is not None
        self._stats = self.runner.control("stats").result(timeout)
        return dict(self._stats)

    # -- avatars
    def _cache_settings(self) -> dict[str, Any]:
        return {"version": self.version, "margin": self.settings.musetalk_extra_margin,
                "shift": self.settings.musetalk_bbox_shift, "mask": self.mask_kind,
                "crop": prep.CROP, "dtype": "float16", "standin": self.standin}

    def prepare_avatar(self, avatar: Avatar, progress: ProgressFn | None = None) -> None:
        runner = self.runner
        if runner is None:
            raise ProcessingError("MuseTalk engine is not loaded")
        report = progress or (lambda _f, _m: None)
        files = {k: os.path.getsize(v) for k, v in self.files.items() if os.path.isfile(v)}
        vae_config = dict(self.vae.config) if self.vae is not None else {}
        key = prep.cache_key(avatar.meta, files, vae_config, self._cache_settings())
        current = avatar.engine_data.get(self.name)
        if current and current.get("key") == key and key in self._avatars:
            return
        with self._prep_lock:
            clips = None if self.standin else self._load_cache(avatar, key)
            source = "disk"
            if clips is None:
                clips = self._compute(avatar, report)
                if not self.standin:
                    self._save_cache(avatar, key, clips)
                source = "computed"
            payload = self._payload(avatar, clips)
            runner.control("add_avatar", key, payload).result(timeout=300)
            self._avatars[key] = payload
        even = avatar.width % 2 == 0 and avatar.height % 2 == 0  # I420 has no odd sizes
        avatar.engine_data[self.name] = {"key": key, "clips": clips, "source": source,
                                         "i420": BaseI420(avatar) if even else None}
        report(1.0, "MuseTalk cache ready")

    def _payload(self, avatar: Avatar, clips: dict[str, ClipData]) -> dict[str, Any]:
        """What the inference core keeps per avatar: the latents (real networks) or, for the
        stand-in, the reference face crops it returns as its faces."""
        if self.standin:
            return {"faces": {n: prep.crop_images(avatar.clip(n).frames, list(map(tuple, c.boxes)))
                              for n, c in clips.items()}}
        return {"latents": {n: c.latents for n, c in clips.items()}}

    def _cache_path(self, avatar: Avatar) -> Path | None:
        return avatar.path / f"musetalk_{self.version}.pt" if avatar.path else None

    def _load_cache(self, avatar: Avatar, key: str) -> dict[str, ClipData] | None:
        path = self._cache_path(avatar)
        if path is None or not path.is_file():
            return None
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
            if raw.get("key") != key:
                return None
            return {n: ClipData(c["boxes"].numpy(), c["context"].numpy(), c["latents"],
                                [m.numpy() for m in c["masks"]]) for n, c in raw["clips"].items()}
        except Exception as exc:  # a stale or damaged cache is rebuilt
            log.warning("rebuilding MuseTalk cache %s: %s", path, exc)
            return None

    def _save_cache(self, avatar: Avatar, key: str, clips: dict[str, ClipData]) -> None:
        path = self._cache_path(avatar)
        if path is None:
            return
        raw = {"key": key, "clips": {n: {"boxes": torch.from_numpy(c.boxes),
                                         "context": torch.from_numpy(c.context),
                                         "latents": c.latents,
                                         "masks": [torch.from_numpy(m) for m in c.masks]}
                                     for n, c in clips.items()}}
        tmp = path.with_suffix(".tmp")
        torch.save(raw, str(tmp))
        tmp.replace(path)

    def _compute(self, avatar: Avatar, report: ProgressFn) -> dict[str, ClipData]:
        s = self.settings
        size = (avatar.width, avatar.height)
        face = avatar.meta.get("face_box") or [avatar.width // 4, avatar.height // 4,
                                               avatar.width // 2, avatar.height // 2]
        box0 = prep.crop_box(face, self.version, s.musetalk_extra_margin, s.musetalk_bbox_shift,
                             size)
        names = avatar.base_videos + avatar.actions
        ref = avatar.clip(names[0]).frames[0]
        out: dict[str, ClipData] = {}
        for k, name in enumerate(names):
            frames = avatar.clip(name).frames
            report(k / len(names), f"MuseTalk: {name}")
            shifts = prep.track_shifts(frames, ref, face)
            boxes = [prep.shifted(box0, d, size) for d in shifts]
            latents = (torch.zeros(0) if self.vae is None else
                       prep.encode_latents(self.vae, prep.crop_images(frames, boxes), self.device,
                                           self.dtype))
            ctx, masks = [], []
            for frame, box in zip(frames, boxes, strict=True):
                c, m = prep.frame_mask(frame, box, self.parsing, self.device, self.version)
                ctx.append(c)
                masks.append(m)
            out[name] = ClipData(np.array(boxes, np.int32), np.array(ctx, np.int32), latents, masks)
        return out

    # -- streams
    def open_stream(self, avatar: Avatar, clock: Callable[[], float] = time.monotonic
                    ) -> LipSyncStream:
        """A stream, if one more fits: past the admission limit RATE_LIMIT_EXCEEDED (at INIT),
        instead of every session's frames coming late."""
        if self.runner is None:
            raise ProcessingError("MuseTalk engine is not loaded")
        if self.name not in avatar.engine_data:
            raise ProcessingError(f"avatar {avatar.avatar_id!r} is not prepared for MuseTalk")
        limit = self.admission_limit
        if self._streams >= limit:
            raise RateLimitExceeded(
                f"MuseTalk is serving {self._streams} sessions, all it can keep in real time "
                "on this device; try again later", {"streams": self._streams, "limit": limit},
                fatal=True)
        deps = StreamDeps(self.hop, self.window_samples,
                          self.settings.musetalk_deadline_ms / 1000.0, lambda: self.runner,
                          self._stream_closed, self._ready)
        self._streams += 1
        return MuseTalkStream(deps, avatar, avatar.engine_data[self.name], clock)

    def _stream_closed(self) -> None:
        self._streams -= 1

    async def aclose(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await asyncio.to_thread(runner.close)
