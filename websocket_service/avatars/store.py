"""Avatar preparation, the on-disk cache under AVATARS_DIR, and the in-memory index.

Layout of one avatar::

    AVATARS_DIR/<avatar_id>/meta.json          id, size, clips, face box, report
    AVATARS_DIR/<avatar_id>/clips/<clip>/NNNN.jpg   frames, JPEG quality 95
    AVATARS_DIR/<avatar_id>/<engine>.*         each engine's own cache

An avatar is written to a temporary folder and renamed into place when complete, so a
crash never leaves a half-written avatar that later loads.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from ..errors import InvalidMessage, ModelNotFound, ProcessingError, RateLimitExceeded, ServiceError
from ..units import ID_RE
from .face import Box, crop_box_for_face, cut, detect_face
from .model import Avatar, Clip, ClipKind
from .probe import IMAGE_SUFFIXES, check_source, too_big
from .synth import BUILTIN_ACTIONS, BUILTIN_BASES, render_motion

log = logging.getLogger(__name__)

AVATAR_ID_RE = ID_RE
FORMAT_VERSION = 1
JPEG_QUALITY = 95
#: a video's kept frames are scaled down to at most this many pixels (720p) as they are
#: decoded, so a job holds at most MAX_PREPARE_SECONDS * FPS + 1 such frames (docs/DEPLOYMENT.md)
PREPARE_FRAME_PIXELS = 1280 * 720
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_FRAMES = 3000
MAX_JOBS_KEPT = 100
MAX_RUNNING_JOBS = 2

Progress = Callable[[float, str], None]


def _noop(_f: float, _m: str) -> None:
    pass


@dataclass
class PrepareJob:
    job_id: str
    avatar_id: str
    status: str = "queued"  # queued | running | done | failed
    progress: float = 0.0
    message: str = ""
    error: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "avatar_id": self.avatar_id, "status": self.status,
                "progress": round(self.progress, 3), "message": self.message, "error": self.error,
                "created": self.created, "finished": self.finished}


def validate_avatar_id(avatar_id: str) -> str:
    if not AVATAR_ID_RE.match(avatar_id):
        raise InvalidMessage("avatar_id must be 1-64 letters, digits, '-' or '_'",
                             {"avatar_id": avatar_id[:80]})
    return avatar_id


# ---------------------------------------------------------------- reading sources

def read_source(path: Path, max_seconds: float, fps: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_frames: int = DEFAULT_MAX_FRAMES) -> tuple[list[np.ndarray], bool]:
    """RGB frames of an image or video file, resampled to ``fps``; (frames, is_still).

    The size is checked from the header first (:mod:`.probe`, ``max_pixels``); a video stops
    after ``max_seconds`` or ``max_frames`` decoded frames, and its kept frames are scaled
    down to ``PREPARE_FRAME_PIXELS``."""
    check_source(path, max_pixels)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ProcessingError(f"could not read image {path.name}")
        return [cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)], True
    try:
        frames: list[np.ndarray] = []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            next_t = 0.0
            for n, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > max_pixels:  # a stream may change size
                    raise too_big(path.name, frame.width, frame.height, max_pixels)
                t = float(frame.time or 0.0)
                if t > max_seconds or n >= max_frames:
                    break
                if t + 1e-6 >= next_t:
                    frames.append(_rgb_fitted(frame))
                    next_t += 1.0 / fps
    except (av.error.FFmpegError, IndexError) as exc:
        raise ProcessingError(f"could not decode video {path.name}: {exc}") from exc
    if not frames:
        raise ProcessingError(f"{path.name} has no video frames")
    return frames, len(frames) == 1


def _rgb_fitted(frame: av.VideoFrame) -> np.ndarray:
    """The frame as RGB, scaled down (aspect kept, even sides) to ``PREPARE_FRAME_PIXELS``."""
    w, h = frame.width, frame.height
    if w * h <= PREPARE_FRAME_PIXELS:
        return frame.to_ndarray(format="rgb24")
    scale = (PREPARE_FRAME_PIXELS / (w * h)) ** 0.5
    w, h = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
    return frame.reformat(width=w, height=h, format="rgb24").to_ndarray()


# ---------------------------------------------------------------- building

def build_avatar(avatar_id: str, frames: list[np.ndarray], still: bool, width: int, height: int,
                 progress: Progress = _noop, face_box: Box | None = None) -> Avatar:
    """Crop every frame around the face and make the base videos and action clips.

    ``face_box`` (x, y, w, h in the frames) is the face where it is known: no detector runs
    (OpenCV 5.x has none; ``bench/bench_gpu_path.py`` on a GPU machine with it)."""
    progress(0.05, "finding the face")
    probe = frames[:: max(1, len(frames) // 10)] if face_box is None else []
    boxes = [b for b in (detect_face(f) for f in probe) if b is not None]
    report: dict[str, Any] = {"frames_in": len(frames), "face_found_in": len(boxes),
                              "face_probed": len(probe)}
    if face_box is not None:
        face = tuple(int(v) for v in face_box)
        report["face_given"] = True
    elif boxes:
        face = tuple(int(v) for v in np.median(np.array(boxes), axis=0))
    else:
        h, w = frames[0].shape[:2]
        side = min(h, w) // 2
        face = (w // 2 - side // 2, h // 3 - side // 2, side, side)
        report["warning"] = "no face found; using a centred crop"
    crop = crop_box_for_face(face)  # type: ignore[arg-type]
    progress(0.15, "cropping")
    cropped = [cut(f, crop, width, height) for f in frames]
    still_img = cropped[0]
    clips: dict[str, Clip] = {}
    if still:
        for name, motion in BUILTIN_BASES.items():
            clips[name] = Clip(name, ClipKind.BASE, render_motion(still_img, motion))
    else:
        clips["idle"] = Clip("idle", ClipKind.BASE, np.stack(cropped))
        for name in ("listening", "speaking"):
            clips[name] = Clip(name, ClipKind.BASE, render_motion(still_img, BUILTIN_BASES[name]))
    progress(0.3, "making action clips")
    for name, motion in BUILTIN_ACTIONS.items():
        clips[name] = Clip(name, ClipKind.ACTION, render_motion(still_img, motion))
    # the face box in output coordinates, for engines
    sx, sy = width / crop[2], height / crop[3]
    face_out = [round((face[0] - crop[0]) * sx), round((face[1] - crop[1]) * sy),
                round(face[2] * sx), round(face[3] * sy)]
    meta = {"avatar_id": avatar_id, "width": width, "height": height, "format": FORMAT_VERSION,
            "source": "still" if still else "video", "face_box": face_out, "crop_box": list(crop),
            "report": report, "created": time.time()}
    return Avatar(avatar_id, width, height, clips, meta=meta)


# ---------------------------------------------------------------- disk

def save_avatar(avatar: Avatar, root: Path) -> Path:
    final = root / avatar.avatar_id
    tmp = root / f".{avatar.avatar_id}.{uuid.uuid4().hex[:8]}.tmp"
    (tmp / "clips").mkdir(parents=True)
    meta = dict(avatar.meta)
    meta["clips"] = {n: {"kind": c.kind.value, "frames": len(c)} for n, c in avatar.clips.items()}
    for name, clip in avatar.clips.items():
        folder = tmp / "clips" / name
        folder.mkdir()
        for i, frame in enumerate(clip.frames):
            ok = cv2.imwrite(str(folder / f"{i:04d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                             [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise ProcessingError(f"could not write avatar frame {folder / f'{i:04d}.jpg'}")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    avatar.path = final
    avatar.meta = meta
    return final


def load_avatar(path: Path) -> Avatar:
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')} != {FORMAT_VERSION}")
        clips = {}
        for name, info in meta["clips"].items():
            frames = np.empty((info["frames"], meta["height"], meta["width"], 3), np.uint8)
            for i in range(info["frames"]):
                bgr = cv2.imread(str(path / "clips" / name / f"{i:04d}.jpg"), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise ValueError(f"missing frame {name}/{i:04d}.jpg")
                frames[i] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            clips[name] = Clip(name, ClipKind(info["kind"]), frames)
        return Avatar(meta["avatar_id"], meta["width"], meta["height"], clips, path=path, meta=meta)
    except (OSError, KeyError, ValueError) as exc:
        raise ProcessingError(f"avatar cache at {path} is unreadable: {exc}") from exc


# ---------------------------------------------------------------- the store

class AvatarStore:
    """Prepared avatars in memory (LRU-bounded) and on disk, and background preparation jobs.

    ``prepare_engine`` is called on every avatar before it is handed out, so the engine's
    own cache exists (it is a no-op when already computed).
    """

    def __init__(self, root: Path, width: int, height: int, fps: int,
                 prepare_engine: Callable[[Avatar, Progress], None],
                 max_in_memory: int = 16, max_seconds: float = 10.0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_frames: int = DEFAULT_MAX_FRAMES) -> None:
        self.root = root
        self.width, self.height, self.fps = width, height, fps
        self.prepare_engine = prepare_engine
        self.max_in_memory = max_in_memory
        self.max_seconds = max_seconds
        self.max_pixels, self.max_frames = max_pixels, max_frames
        self._mem: OrderedDict[str, Avatar] = OrderedDict()
        self._jobs: OrderedDict[str, PrepareJob] = OrderedDict()
        self._lock = threading.Lock()
        # jobs run in a bounded pool; the semaphore makes "at most MAX_RUNNING_JOBS" one
        # atomic step instead of a check followed, after an upload, by a submit
        self._slots = threading.BoundedSemaphore(MAX_RUNNING_JOBS)
        self._pool = ThreadPoolExecutor(MAX_RUNNING_JOBS, thread_name_prefix="prepare")
        root.mkdir(parents=True, exist_ok=True)

    # -- lookup
    def exists(self, avatar_id: str) -> bool:
        return avatar_id in self._mem or (self.root / avatar_id / "meta.json").exists()

    def get(self, avatar_id: str) -> Avatar:
        """A prepared avatar (blocking: call from a worker thread when not cached)."""
        with self._lock:
            if avatar_id in self._mem:
                self._mem.move_to_end(avatar_id)
                return self._mem[avatar_id]
        if not AVATAR_ID_RE.match(avatar_id) or not self.exists(avatar_id):
            raise ModelNotFound(f"avatar {avatar_id!r} is not prepared",
                                {"avatar_id": avatar_id[:80], "available": self.ids()})
        avatar = load_avatar(self.root / avatar_id)
        self.prepare_engine(avatar, _noop)
        self._remember(avatar)
        return avatar

    def cached(self, avatar_id: str) -> Avatar | None:
        return self._mem.get(avatar_id)

    def loaded_ids(self) -> list[str]:
        """Avatars held in memory, least recently used first."""
        with self._lock:
            return list(self._mem)

    def ids(self) -> list[str]:
        on_disk = {p.name for p in self.root.iterdir() if (p / "meta.json").exists()}
        return sorted(on_disk | set(self._mem))

    def describe(self, avatar_id: str) -> dict[str, Any]:
        path = self.root / avatar_id / "meta.json"
        if not AVATAR_ID_RE.match(avatar_id) or not path.exists():
            raise ModelNotFound(f"avatar {avatar_id!r} is not prepared", {"avatar_id": avatar_id[:80]})
        meta = json.loads(path.read_text())
        meta["loaded"] = avatar_id in self._mem
        return meta

    def _remember(self, avatar: Avatar) -> None:
        with self._lock:
            self._mem[avatar.avatar_id] = avatar
            self._mem.move_to_end(avatar.avatar_id)
            while len(self._mem) > self.max_in_memory:
                self._mem.popitem(last=False)  # sessions keep their own reference

    # -- preparation
    def prepare(self, avatar_id: str, source: Path, progress: Progress = _noop) -> Avatar:
        validate_avatar_id(avatar_id)
        progress(0.0, "reading source")
        frames, still = read_source(source, self.max_seconds, self.fps, self.max_pixels,
                                    self.max_frames)
        avatar = build_avatar(avatar_id, frames, still, self.width, self.height, progress)
        progress(0.4, "saving")
        save_avatar(avatar, self.root)
        progress(0.5, "engine analysis")
        self.prepare_engine(avatar, lambda f, m: progress(0.5 + 0.5 * f, m))
        self._remember(avatar)
        progress(1.0, "done")
        return avatar

    def ensure_builtin(self, avatar_id: str) -> Avatar:
        """The embedded default avatar, built from scikit-image's astronaut photo once."""
        if self.exists(avatar_id):
            try:
                avatar = self.get(avatar_id)
                if set(BUILTIN_BASES) <= set(avatar.base_videos):
                    return avatar
                log.info("rebuilding built-in avatar %s: it lacks new base videos", avatar_id)
            except ProcessingError:
                log.warning("rebuilding unreadable built-in avatar %s", avatar_id)
        from skimage import data  # noqa: PLC0415 - ships the public-domain photo

        avatar = build_avatar(avatar_id, [data.astronaut()], True, self.width, self.height)
        avatar.meta["source"] = "builtin:skimage.data.astronaut"
        save_avatar(avatar, self.root)
        self.prepare_engine(avatar, _noop)
        self._remember(avatar)
        return avatar

    # -- jobs
    def check_job_slot(self) -> None:
        """Refuse early (:class:`RateLimitExceeded`) while every slot is taken."""
        if self.running_jobs() >= MAX_RUNNING_JOBS:  # a hint only: claiming is the atomic step
            self._refuse()

    def claim_job_slot(self) -> None:
        """Take one of the ``MAX_RUNNING_JOBS`` slots or raise :class:`RateLimitExceeded`.
        ``submit(..., claimed=True)`` hands it to the job, which frees it when it ends; a
        caller that does not get as far as submitting gives it back (:meth:`release_job_slot`)."""
        if not self._slots.acquire(blocking=False):
            self._refuse()

    def release_job_slot(self) -> None:
        self._slots.release()

    @staticmethod
    def _refuse() -> None:
        raise RateLimitExceeded(f"{MAX_RUNNING_JOBS} avatar preparations are already running; "
                                "try again later", {"max_running_jobs": MAX_RUNNING_JOBS})

    def submit(self, avatar_id: str, source: Path, cleanup: bool = False,
               claimed: bool = False) -> PrepareJob:
        """Run a preparation in the job pool, in a slot the caller ``claimed`` (else one is
        taken here: :class:`RateLimitExceeded` when none is free)."""
        validate_avatar_id(avatar_id)
        if not claimed:
            self.claim_job_slot()
        job = PrepareJob(uuid.uuid4().hex, avatar_id)
        with self._lock:
            self._jobs[job.job_id] = job
            while len(self._jobs) > MAX_JOBS_KEPT:
                self._jobs.popitem(last=False)
        try:
            self._pool.submit(self._run_job, job, source, cleanup)
        except BaseException:
            if not claimed:
                self._slots.release()
            raise
        return job

    def running_jobs(self) -> int:
        return sum(j.status in ("queued", "running") for j in list(self._jobs.values()))

    def close(self) -> None:
        """Stop taking jobs, drop queued ones and wait for a running one (blocking)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def job(self, job_id: str) -> PrepareJob | None:
        return self._jobs.get(job_id)

    def _run_job(self, job: PrepareJob, source: Path, cleanup: bool) -> None:
        def progress(f: float, msg: str) -> None:
            job.progress, job.message = max(job.progress, f), msg

        job.status = "running"
        try:
            self.prepare(job.avatar_id, source, progress)
            job.status = "done"
        except Exception as exc:  # noqa: BLE001 - reported through the job, never raised
            # only our own errors say what went wrong (others, e.g. cv2.error, carry a code of
            # their own that is not ours to show)
            ours = exc if isinstance(exc, ServiceError) else None
            code = ours.code if ours else "PROCESSING_ERROR"
            msg = (ours.message if ours else None) or "avatar preparation failed"
            if ours is None:
                log.exception("avatar preparation %s failed", job.avatar_id)
            job.status, job.error = "failed", {"code": code, "message": msg}
        finally:
            job.finished = time.time()
            if cleanup:
                source.unlink(missing_ok=True)
            self._slots.release()
