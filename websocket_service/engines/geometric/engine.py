"""The weight-free lip-sync engine: mouth geometry + streaming audio analysis + warping.

* :mod:`.geometry` / :mod:`.prepare` - offline mouth localisation per avatar frame, cached.
* :mod:`.audio` - causal audio analysis, one pose (opening, shape) per 40 ms frame.
* :mod:`.fields`, :mod:`.interior`, :mod:`.render` - the warp, the mouth interior, blending.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ...avatars.model import Avatar, BaseFrame
from ...config import Settings
from ..base import LipSyncEngine, LipSyncStream, ProgressFn
from .fields import MouthPose
from .prepare import CACHE_NAME, analyse_avatar, fingerprint, load_cache, save_cache
from .render import MouthRenderer
from .stream import GeometricStream

log = logging.getLogger(__name__)


class GeometricEngine(LipSyncEngine):
    name = "geometric"
    lookahead_frames = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self) -> None:
        """Nothing to load: the engine uses no weights (OpenCV's cascades ship in its wheel)."""

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "loaded": True, "device": "cpu",
                "lookahead_ms": 40 * self.lookahead_frames, "weights": None}

    def prepare_avatar(self, avatar: Avatar, progress: ProgressFn | None = None) -> None:
        """Mouth geometry of every frame (from ``geometric.npz`` when it is current)."""
        if self.name in avatar.engine_data:
            return
        key = fingerprint(avatar)
        path = avatar.path / CACHE_NAME if avatar.path else None
        data = load_cache(path, key) if path and path.exists() else None
        if data is None:
            data = analyse_avatar(avatar, progress)
            data["report"]["cache"] = "computed"
            if path is not None:
                save_cache(path, key, data)
        data["renderer"] = MouthRenderer(data["report"]["median_mouth_width"],
                                         paint_teeth=not data["report"]["teeth_visible"],
                                         bend=data["report"]["lip_bend"],
                                         nose=data["report"]["nose_above"]
                                         * data["report"]["median_mouth_width"])
        avatar.engine_data[self.name] = data
        avatar.meta.setdefault("engine_reports", {})[self.name] = data["report"]
        if data["report"].get("warning"):
            log.warning("avatar %s: %s", avatar.avatar_id, data["report"]["warning"])

    def open_stream(self, avatar: Avatar, clock: Callable[[], float] = time.monotonic
                    ) -> LipSyncStream:
        if self.name not in avatar.engine_data:
            self.prepare_avatar(avatar)
        return GeometricStream(functools.partial(self.render, avatar), self.lookahead_frames,
                               clock)

    def geometry(self, avatar: Avatar, base: BaseFrame) -> np.ndarray:
        """The geometry row of ``base``'s (clip, index); the nearest known frame otherwise."""
        geo = avatar.engine_data[self.name]["geometry"]
        rows = geo.get(base.clip)
        if rows is None:
            rows = next(iter(geo.values()))
        return rows[min(max(base.index, 0), len(rows) - 1)]

    def render(self, avatar: Avatar, base: BaseFrame, pose: MouthPose) -> np.ndarray:
        data = avatar.engine_data[self.name]
        renderer: MouthRenderer = data["renderer"]
        if base.image.shape[:2] != (avatar.height, avatar.width):
            raise ValueError(f"frame {base.image.shape} is not the avatar size "
                             f"{avatar.width}x{avatar.height}")
        return renderer.render(base.image, self.geometry(avatar, base), pose)
