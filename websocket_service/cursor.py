"""Which avatar frame plays next: the ping-pong base loop and spliced action clips."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .avatars.model import Avatar, BaseFrame
from .errors import InvalidStateTransition, ModelNotFound


def pingpong(pos: int, n: int) -> int:
    """Frame index for loop position ``pos`` over frames 0..n-1..1 (period 2n-2, no seam)."""
    if n <= 1:
        return 0
    period = 2 * n - 2
    p = pos % period
    return p if p < n else period - p


@dataclass
class _Action:
    name: str
    i: int
    n: int


class Cursor:
    """Advances one frame per call of :meth:`next`.

    The base loop keeps running underneath an action, so the crossfade out of the action
    lands on the live loop and the loop continues from where it was.
    """

    def __init__(self, avatar: Avatar, base_video: str, crossfade: int) -> None:
        self.avatar = avatar
        self.crossfade = crossfade
        self.base_video = self._check_base(base_video)
        self.pos = 0
        self.action: _Action | None = None

    def _check_base(self, name: str) -> str:
        if name not in self.avatar.base_videos:
            raise ModelNotFound(f"unknown base video {name!r}",
                                {"base_video": name[:64], "available": self.avatar.base_videos})
        return name

    def set_base_video(self, name: str) -> None:
        self.base_video = self._check_base(name)

    def start_action(self, name: str) -> None:
        if name not in self.avatar.actions:
            raise ModelNotFound(f"unknown action {name!r}",
                                {"action_name": name[:64], "available": self.avatar.actions})
        if self.action is not None:
            raise InvalidStateTransition(f"action {self.action.name!r} is still playing",
                                         {"from": "action", "to": "action"})
        self.action = _Action(name, 0, len(self.avatar.clip(name)))

    def next(self) -> BaseFrame:
        clip = self.avatar.clip(self.base_video)
        idx = pingpong(self.pos, len(clip))
        self.pos += 1
        base_img = clip.frames[idx]
        act = self.action
        if act is None:
            return BaseFrame(self.base_video, idx, base_img)
        frames = self.avatar.clip(act.name).frames
        img = frames[act.i]
        k = self.crossfade
        edge = min(act.i + 1, act.n - act.i)  # distance to the nearer end, 1-based
        if k and edge <= k:
            alpha = edge / (k + 1)
            img = cv2.addWeighted(img, alpha, base_img, 1.0 - alpha, 0.0)
        frame = BaseFrame(act.name, act.i, img, act.name, (act.i + 1) / act.n)
        act.i += 1
        if act.i >= act.n:
            self.action = None
        return frame


def resize_to(img: np.ndarray, width: int, height: int) -> np.ndarray:
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
