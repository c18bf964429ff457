"""Recording a session to MP4 by remuxing the H.264 packets it already sends (no second
video encode) and encoding its audio (the speech each frame plays with) to AAC.

The feed hands every sent frame to :meth:`Recorder.put` (non-blocking); a thread of the
recorder's own writes the file. The recording starts at the first keyframe it is handed
(the feed asks its encoder for one). Bounded: at most ``MAX_QUEUE`` frames wait for the disk
(beyond that the recording ends there, so the file never holds a broken GOP, and says why),
and the file stops growing at ``max_bytes``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..units import SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)

MAX_QUEUE = 250  # 10 s of frames waiting for the disk


@dataclass
class RecordingInfo:
    recording_id: str
    session_id: str
    path: Path
    status: str = "recording"  # recording | done | failed
    reason: str | None = None  # why it stopped early (disk limit, disk too slow, error)
    frames: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    user_id: str = ""  # the session's owner: only they (or the operator) may list or fetch it

    def as_dict(self) -> dict[str, Any]:
        size = self.path.stat().st_size if self.path.exists() else 0
        return {"recording_id": self.recording_id, "session_id": self.session_id,
                "user_id": self.user_id, "status": self.status, "reason": self.reason, "frames": self.frames,
                "duration_s": round(self.frames * SAMPLES_PER_FRAME / SAMPLE_RATE, 3),
                "bytes": size, "url": f"/recordings/{self.recording_id}"}


class Recorder:
    def __init__(self, info: RecordingInfo, width: int, height: int, fps: int,
                 max_bytes: int) -> None:
        self.info = info
        self.size = (width, height)
        self.fps = fps
        self.max_bytes = max_bytes
        self._q: queue.Queue[tuple[bytes, bool, np.ndarray] | None] = queue.Queue(MAX_QUEUE)
        self._stopped = False
        self._thread = threading.Thread(target=self._write, name=f"rec-{info.recording_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def put(self, data: bytes, keyframe: bool, pcm: np.ndarray) -> None:
        """One sent frame (its Annex B access unit, keyframe flag, its ``SAMPLES_PER_FRAME`` samples)."""
        if self._stopped:
            return
        try:
            self._q.put_nowait((data, keyframe, pcm))
        except queue.Full:  # the disk cannot keep up: end here rather than write broken video
            self._stop_early("the disk could not keep up")

    def _stop_early(self, reason: str) -> None:
        if not self._stopped:
            self.info.reason = reason
            self.stop()

    def stop(self) -> None:
        """No more frames; the thread finishes the file (see :meth:`join`)."""
        if not self._stopped:
            self._stopped = True
            self._q.put(None)

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)

    def _write(self) -> None:
        info = self.info
        try:
            with av.open(str(info.path), "w", format="mp4") as out:
                vs = out.add_stream("h264", rate=self.fps)
                vs.width, vs.height, vs.pix_fmt = self.size[0], self.size[1], "yuv420p"
                vs.time_base = Fraction(1, self.fps)
                aus = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
                self._loop(out, vs, aus)
                for p in aus.encode(None):
                    out.mux(p)
            info.status = "done"
        except Exception:  # noqa: BLE001 - reported through the recording's status
            log.exception("recording %s failed", info.recording_id)
            info.status, info.reason = "failed", info.reason or "the file could not be written"
        info.finished = time.time()

    def _loop(self, out: Any, vs: Any, aus: Any) -> None:
        info = self.info
        while (item := self._q.get()) is not None:
            data, keyframe, pcm = item
            if info.frames == 0 and not keyframe:
                continue  # a recording starts at a keyframe
            pkt = av.Packet(data)
            pkt.pts = pkt.dts = info.frames
            pkt.time_base = Fraction(1, self.fps)
            pkt.is_keyframe = keyframe
            pkt.stream = vs
            out.mux(pkt)
            af = av.AudioFrame.from_ndarray((pcm.astype(np.float32) / 32768.0).reshape(1, -1),
                                            format="fltp", layout="mono")
            af.sample_rate, af.pts = SAMPLE_RATE, info.frames * SAMPLES_PER_FRAME
            af.time_base = Fraction(1, SAMPLE_RATE)
            for p in aus.encode(af):
                out.mux(p)
            info.frames += 1
            if info.frames % 25 == 0 and info.path.stat().st_size >= self.max_bytes:
                info.reason = "the recordings folder reached MAX_RECORDINGS_MB"
                self._stopped = True
                return
