"""A media bridge: an external renderer's frames and audio, played out on the session's clock.

Another model server (a LivePortrait renderer and a TTS, say) pushes timestamped frames and
16 kHz PCM; the session shows them instead of its own frames, encoded and streamed like any
other (to every transport and viewer), paced by the session's playout: at each tick the
newest pushed frame whose timestamp has come is shown (earlier ones are skipped, a frame
that has not come yet is waited for by holding the last), and the next 40 ms of pushed audio
plays with it (a frame counts as come from half a period before its time, so frames pushed
on a 40 ms grid land on the ticks nearest them). Timestamps are ms on the pusher's own clock,
anchored to the session clock
at the first push; they must not go backwards.

Bounded: at most ``MAX_FRAMES`` frames and ``MAX_AUDIO_S`` of audio wait; pushing past that
is refused with RATE_LIMIT_EXCEEDED. In-process use: ``session.bridge().push_frame(...)``.
"""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np

from .errors import InvalidMessage, RateLimitExceeded
from .units import SAMPLE_RATE, SAMPLES_PER_FRAME

FORMATS = ("rgb24", "rgba", "i420", "jpeg")
MAX_FRAMES = 50  # 2 s at 25 fps
MAX_AUDIO_S = 5.0
SPEAKING_HOLD_S = 0.3  # audio this recent makes the frame "speaking"
SLACK_MS = 20.0  # half a frame: a frame shows on the tick nearest its timestamp


def to_rgb(data: bytes, fmt: str, width: int, height: int) -> np.ndarray:
    """An RGB (H, W, 3) uint8 image from ``data``; InvalidMessage naming what is wrong."""
    if fmt not in FORMATS:
        raise InvalidMessage(f"unknown frame format {fmt[:20]!r}", {"formats": list(FORMATS)})
    if fmt == "jpeg":
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise InvalidMessage("the JPEG does not decode")
        if img.shape[:2] != (height, width):
            raise InvalidMessage(f"JPEG is {img.shape[1]}x{img.shape[0]}, the session is "
                                 f"{width}x{height}", {"width": width, "height": height})
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    need = {"rgb24": width * height * 3, "rgba": width * height * 4,
            "i420": width * height * 3 // 2}[fmt]
    if len(data) != need:
        raise InvalidMessage(f"a {width}x{height} {fmt} frame is {need} bytes, got {len(data)}",
                             {"expected_bytes": need, "width": width, "height": height})
    buf = np.frombuffer(data, np.uint8)
    if fmt == "rgb24":
        return buf.reshape(height, width, 3)
    if fmt == "rgba":
        return np.ascontiguousarray(buf.reshape(height, width, 4)[..., :3])
    return cv2.cvtColor(buf.reshape(height * 3 // 2, width), cv2.COLOR_YUV2RGB_I420)


class Bridge:
    """The pushed media of one session (see the module docstring)."""

    def __init__(self, width: int, height: int, fmt: str = "rgb24") -> None:
        if fmt not in FORMATS:
            raise InvalidMessage(f"unknown frame format {fmt[:20]!r}", {"formats": list(FORMATS)})
        self.width, self.height, self.format = width, height, fmt
        self.frames: deque[tuple[float, np.ndarray]] = deque()
        self.audio: deque[np.ndarray] = deque()
        self._audio_len = 0
        self._carry = np.zeros(0, np.int16)
        self.anchor: float | None = None  # session time (s) of pusher time 0
        self.last_frame_ts = -1.0
        self.last_audio_ts = -1.0
        self.last_audio_at = -1e9
        self.current: np.ndarray | None = None
        self.frames_pushed = self.frames_shown = 0

    # ------------------------------------------------------------------ pushing
    def push_frame(self, data: bytes | np.ndarray, ts_ms: float, now: float,
                   fmt: str | None = None) -> None:
        """A frame for pusher time ``ts_ms``: bytes in ``fmt`` (default: the bridge's format)
        or an RGB array."""
        self._check_ts(ts_ms, self.last_frame_ts, "frame")
        if isinstance(data, np.ndarray):
            if data.shape != (self.height, self.width, 3) or data.dtype != np.uint8:
                raise InvalidMessage(f"frame must be ({self.height}, {self.width}, 3) uint8 RGB")
            img = data
        else:
            img = to_rgb(data, fmt or self.format, self.width, self.height)
        if len(self.frames) >= MAX_FRAMES:
            raise RateLimitExceeded(f"more than {MAX_FRAMES} frames wait to be shown: push no "
                                    "faster than real time", {"max_frames": MAX_FRAMES})
        self._anchor(ts_ms, now)
        self.frames.append((ts_ms, img))
        self.last_frame_ts = ts_ms
        self.frames_pushed += 1

    def push_audio(self, pcm: np.ndarray, ts_ms: float, now: float) -> None:
        """16 kHz mono int16 samples starting at pusher time ``ts_ms``."""
        self._check_ts(ts_ms, self.last_audio_ts, "audio")
        if self._audio_len + len(pcm) > MAX_AUDIO_S * SAMPLE_RATE:
            raise RateLimitExceeded(f"more than {MAX_AUDIO_S:g} s of audio waits to be played",
                                    {"max_audio_s": MAX_AUDIO_S})
        self._anchor(ts_ms, now)
        self.audio.append(pcm.astype(np.int16, copy=False))
        self._audio_len += len(pcm)
        self.last_audio_ts = ts_ms

    def _check_ts(self, ts_ms: float, last: float, what: str) -> None:
        if not np.isfinite(ts_ms) or ts_ms < 0:
            raise InvalidMessage(f"{what} timestamp must be a finite number of ms >= 0")
        if ts_ms < last:
            raise InvalidMessage(f"{what} timestamp {ts_ms:g} ms goes back (last {last:g} ms)",
                                 {"timestamp_ms": ts_ms, "last_ms": last})

    def _anchor(self, ts_ms: float, now: float) -> None:
        if self.anchor is None:
            self.anchor = now - ts_ms / 1000.0

    # ------------------------------------------------------------------ playing
    def take(self, now: float) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """(image, the tick's 640 samples, speaking) for session time ``now``; None before
        the first frame."""
        if self.anchor is not None:
            due = (now - self.anchor) * 1000.0 + SLACK_MS
            while self.frames and self.frames[0][0] <= due:
                self.current = self.frames.popleft()[1]
                self.frames_shown += 1
        if self.current is None:
            return None
        pcm = self._next_audio()
        if pcm.any():
            self.last_audio_at = now
        return self.current, pcm, now - self.last_audio_at < SPEAKING_HOLD_S

    def _next_audio(self) -> np.ndarray:
        parts, n = [self._carry], len(self._carry)
        while n < SAMPLES_PER_FRAME and self.audio:
            piece = self.audio.popleft()
            self._audio_len -= len(piece)
            parts.append(piece)
            n += len(piece)
        pcm = np.concatenate(parts) if len(parts) > 1 else self._carry
        out, self._carry = pcm[:SAMPLES_PER_FRAME], pcm[SAMPLES_PER_FRAME:]
        return np.pad(out, (0, SAMPLES_PER_FRAME - len(out))) if len(out) < SAMPLES_PER_FRAME else out
