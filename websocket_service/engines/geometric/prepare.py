"""Per-avatar preparation: mouth geometry of every clip frame, cached as ``geometric.npz``.

The cache is keyed by a fingerprint of the avatar build (id, size, creation time, clips and
frame counts) and the geometry format version, so a rebuilt avatar is re-analysed and an
unchanged one loads in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...avatars.model import Avatar
from ..base import ProgressFn
from .geometry import (
    CURVE,
    CY,
    FACE_FOUND,
    FIELDS,
    MOUTH_FOUND,
    NOSE_Y,
    TEETH,
    WIDTH,
    analyse_clip,
)

log = logging.getLogger(__name__)

CACHE_NAME = "geometric.npz"
VERSION = 3


def fingerprint(avatar: Avatar) -> str:
    """Identifies the avatar build (not its pixels: frames reloaded from JPEG differ a bit)."""
    clips = ",".join(f"{n}:{len(c)}" for n, c in sorted(avatar.clips.items()))
    text = (f"v{VERSION}|{avatar.avatar_id}|{avatar.width}x{avatar.height}|"
            f"{avatar.meta.get('created')}|{avatar.meta.get('source')}|{clips}")
    return hashlib.sha1(text.encode()).hexdigest()


def load_cache(path: Path, key: str) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            report = json.loads(str(z["report"]))
            geo = {k[4:]: z[k].astype(np.float32) for k in z.files if k.startswith("geo_")}
    except (OSError, KeyError, ValueError) as exc:
        log.warning("geometric cache %s unreadable (%s); recomputing", path, exc)
        return None
    report["cache"] = "loaded"
    return {"geometry": geo, "report": report}


def save_cache(path: Path, key: str, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"geo_{k}": v for k, v in data["geometry"].items()}
    np.savez(tmp, key=np.array(key), report=np.array(json.dumps(data["report"])), **arrays)
    tmp.replace(path)


def analyse_avatar(avatar: Avatar, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Geometry of every frame of every clip, plus a preparation report."""
    face0 = tuple(float(v) for v in (avatar.meta.get("face_box")
                                     or [avatar.width / 4, avatar.height / 4,
                                         avatar.width / 2, avatar.height / 2]))
    geo: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {"fields": list(FIELDS), "clips": {}}
    names = list(avatar.clips)
    for i, name in enumerate(names):
        if progress:
            progress(i / len(names), f"mouth geometry: {name}")
        clip_report: dict[str, Any] = {}
        rows = analyse_clip(avatar.clips[name].frames, face0, clip_report)  # type: ignore[arg-type]
        geo[name] = rows
        clip_report.update(frames=len(rows), face_missing=int((rows[:, FACE_FOUND] == 0).sum()),
                           mouth_found=int(rows[:, MOUTH_FOUND].sum()))
        report["clips"][name] = clip_report
    total = sum(c["frames"] for c in report["clips"].values())
    missing = sum(c["face_missing"] for c in report["clips"].values())
    rows = np.concatenate(list(geo.values()))
    report.update(frames=total, face_missing=missing,
                  median_mouth_width=float(np.median(rows[:, WIDTH])),
                  teeth_visible=bool(rows[:, TEETH].mean() > 0.5),
                  lip_bend=float(np.median(rows[:, CURVE] * rows[:, WIDTH])),
                  nose_above=float(np.min((rows[:, CY] - rows[:, NOSE_Y]) / rows[:, WIDTH])))
    if missing:
        report["warning"] = (f"no face found in {missing} of {total} frames; "
                             "the last good geometry was kept for them")
    if progress:
        progress(1.0, "mouth geometry done")
    return {"geometry": geo, "report": report}
