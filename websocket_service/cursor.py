"""Which avatar frame plays next: the ping-pong base loop and spliced action clips."""

from __future__ import annotations

from dataclasses import dataclass

import cv2

from .avatars.model import Avatar, BaseFrame
from .errors import InvalidStateTransition, ModelNotFound


def loop_period(n: int) -> int:
    """Frames in one ping-pong period of an ``n``-frame clip."""
    return max(1, 2 * n - 2)


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
        self.speech_video: str | None = None  # the base for speech; None: ``base_video``
        self.pos = 0
        self.action: _Action | None = None

    def _check_base(self, name: str) -> str:
        """The base clip called ``name`` (upstream name like ``idle_0`` or the clip's own)."""
        clip = self.avatar.names.clip(name)
        if clip is None or clip not in self.avatar.base_videos:
            names = self.avatar.names
            raise ModelNotFound(f"unknown base video {name[:64]!r}",
                                {"base_video": name[:64],
                                 "available": [names.public(c) for c in self.avatar.base_videos]})
        return clip

    def set_base_video(self, name: str) -> None:
        self.base_video = self._check_base(name)

    def set_speech_video(self, name: str) -> None:
        self.speech_video = self._check_base(name)

    @property
    def speaking_clip(self) -> str:
        return self.speech_video or self.base_video

    def action_clip(self, name: str) -> str:
        """The action clip called ``name`` (``action_1`` or the clip's own name)."""
        clip = self.avatar.names.clip(name)
        if clip is None or clip not in self.avatar.actions:
            names = self.avatar.names
            raise ModelNotFound(f"unknown action {name[:64]!r}",
                                {"action": name[:64],
                                 "available": [names.public(c) for c in self.avatar.actions]})
        return clip

    def start_action(self, name: str) -> str:
        """Splice in the action clip ``name``; returns its clip name."""
        clip = self.action_clip(name)
        if self.action is not None:
            raise InvalidStateTransition(f"action {self.action.name!r} is still playing",
                                         {"from": "action", "to": "action"})
        self.action = _Action(clip, 0, len(self.avatar.clip(clip)))
        return clip

    def next(self, speech: bool = False) -> BaseFrame:
        """The next frame of the loop (of the speech base when ``speech``), or of the action."""
        name = self.speaking_clip if speech else self.base_video
        clip = self.avatar.clip(name)
        idx = pingpong(self.pos, len(clip))
        self.pos += 1
        base_img = clip.frames[idx]
        act = self.action
        if act is None:
            return BaseFrame(name, idx, base_img)
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
