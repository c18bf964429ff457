"""The MuseTalk engine: loads the models, prepares avatars, owns the inference worker."""

from __future__ import annotations

import asyncio
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
from ...errors import ModelNotFound, ProcessingError
from ..base import LipSyncEngine, LipSyncStream, ProgressFn
from . import prep
from .audio import (
    AUDIO_LOOKAHEAD_FRAMES,
    WHISPER_HOP,
    WINDOW,
    LogMel,
    WhisperStates,
    frame_window,
    positional_encoding,
)
from .loader import Bundle, load_bundle
from .prep import ClipData
from .stream import MuseTalkStream, StreamDeps
from .worker import InferenceWorker

log = logging.getLogger(__name__)
DEFAULT_HOP = Settings.model_fields["musetalk_hop_frames"].default


class MuseTalkEngine(LipSyncEngine):
    """MuseTalk v1.5 / v1.0 on diffusers + transformers: single-step latent inpainting per frame."""

    name = "musetalk"
    #: the window reaches 3 frames past a frame's slot, and features are computed once per hop
    lookahead_frames = AUDIO_LOOKAHEAD_FRAMES + DEFAULT_HOP - 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = settings.musetalk_version
        self.hop = settings.musetalk_hop_frames
        self.lookahead_frames = AUDIO_LOOKAHEAD_FRAMES + self.hop - 1
        self.context_samples = settings.musetalk_audio_context_ms * 16
        self.bundle: Bundle | None = None
        self.worker: InferenceWorker | None = None
        self.whisper: WhisperStates | None = None
        self.max_window_samples = 0
        self._enc_lock = threading.Lock()
        self._prep_lock = threading.Lock()

    # -- loading
    def load(self) -> None:
        s = self.settings
        self.attach(load_bundle(Path(s.model_path), self.version, s.device, s.use_float16))

    def attach(self, b: Bundle) -> None:
        """Start on already-built models (``load`` from files, or the benchmark's in-memory ones)."""
        s = self.settings
        d_model = int(b.whisper_config.d_model)
        cross = int(b.unet.config.cross_attention_dim)
        if cross != d_model:
            raise ModelNotFound(f"UNet cross_attention_dim {cross} != Whisper d_model {d_model}",
                                {"file": b.files.get("unet_config", "")}, fatal=True)
        fe = b.feature_extractor
        logmel = LogMel(fe.mel_filters, fe.n_fft, fe.hop_length, fe.n_samples, b.device)
        self.whisper = WhisperStates(b.encoder, logmel, s.musetalk_whisper_window)
        self.max_window_samples = min(fe.n_samples, self.whisper.max_frames * WHISPER_HOP)
        pe = positional_encoding(WINDOW * self.whisper.n_layers, d_model)
        self.worker = InferenceWorker(b.unet, b.vae, pe, b.device, b.dtype, s.batch_max,
                                      s.batch_wait_ms, s.musetalk_queue_frames)
        self.bundle = b
        log.info("MuseTalk %s loaded on %s (%s); mask: %s", self.version, b.device, b.dtype,
                 self.mask_kind)

    @property
    def mask_kind(self) -> str:
        if self.bundle is not None and self.bundle.parsing is not None:
            return "face-parsing"
        if self.bundle is not None and self.bundle.warnings:
            return "geometric (face-parse-bisent/79999_iter.pth did not load)"
        return "geometric (face-parse-bisent/79999_iter.pth not found)"

    def info(self) -> dict[str, Any]:
        b = self.bundle
        out: dict[str, Any] = {"name": self.name, "loaded": b is not None,
                               "device": str(b.device) if b else "none", "version": self.version}
        if b is None:
            return out
        out.update({"dtype": str(b.dtype).replace("torch.", ""), "files": b.files,
                    "warnings": b.warnings,
                    "mask": self.mask_kind, "hop_frames": self.hop,
                    "lookahead_ms": 40 * self.lookahead_frames,
                    "whisper_window": self.settings.musetalk_whisper_window,
                    "batch_max": self.settings.batch_max, "stats": self.stats()})
        return out

    def stats(self) -> dict[str, float]:
        """Batching counters: batches, frames, max_batch, sessions_per_batch_max, rates."""
        return self.worker.stats() if self.worker else {}

    # -- audio features (called from worker threads)
    def features(self, jobs: list[tuple]) -> list[torch.Tensor]:
        """Audio tokens [tokens, d_model] for each frame of each job (see MuseTalkStream)."""
        assert self.whisper is not None
        out: list[torch.Tensor] = []
        with self._enc_lock, torch.inference_mode():
            for pcm, offset, n_valid, indices in jobs:
                states = self.whisper(pcm)
                out.extend(frame_window(states, f, offset, n_valid) for f in indices)
        return out

    # -- avatars
    def _cache_settings(self) -> dict[str, Any]:
        return {"version": self.version, "margin": self.settings.musetalk_extra_margin,
                "shift": self.settings.musetalk_bbox_shift, "mask": self.mask_kind,
                "crop": prep.CROP, "dtype": "float16"}

    def prepare_avatar(self, avatar: Avatar, progress: ProgressFn | None = None) -> None:
        if self.bundle is None:
            raise ProcessingError("MuseTalk engine is not loaded")
        report = progress or (lambda _f, _m: None)
        files = {k: os.path.getsize(v) for k, v in self.bundle.files.items()}
        key = prep.cache_key(avatar.meta, files, dict(self.bundle.vae.config),
                             self._cache_settings())
        current = avatar.engine_data.get(self.name)
        if current and current.get("key") == key:
            return
        with self._prep_lock:
            clips = self._load_cache(avatar, key)
            source = "disk"
            if clips is None:
                clips = self._compute(avatar, report)
                self._save_cache(avatar, key, clips)
                source = "computed"
        dev = {n: c.latents.to(self.bundle.device, self.bundle.dtype) for n, c in clips.items()}
        avatar.engine_data[self.name] = {"key": key, "clips": clips, "latents_dev": dev,
                                         "source": source}
        report(1.0, "MuseTalk cache ready")

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
        b = self.bundle
        assert b is not None
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
            latents = prep.encode_latents(b.vae, prep.crop_images(frames, boxes), b.device, b.dtype)
            ctx, masks = [], []
            for frame, box in zip(frames, boxes, strict=True):
                c, m = prep.frame_mask(frame, box, b.parsing, b.device, self.version)
                ctx.append(c)
                masks.append(m)
            out[name] = ClipData(np.array(boxes, np.int32), np.array(ctx, np.int32), latents, masks)
        return out

    # -- streams
    def open_stream(self, avatar: Avatar, clock: Callable[[], float] = time.monotonic
                    ) -> LipSyncStream:
        if self.worker is None:
            raise ProcessingError("MuseTalk engine is not loaded")
        if self.name not in avatar.engine_data:
            raise ProcessingError(f"avatar {avatar.avatar_id!r} is not prepared for MuseTalk")
        deps = StreamDeps(self.hop, self.context_samples, self.max_window_samples,
                          self.settings.batch_max, self.features, lambda: self.worker)
        return MuseTalkStream(deps, avatar, avatar.engine_data[self.name], clock)

    async def aclose(self) -> None:
        if self.worker is not None:
            await asyncio.to_thread(self.worker.close)
