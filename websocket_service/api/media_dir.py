"""Files the REST API may name by path: only inside ``MEDIA_DIR``.

A path is taken relative to ``MEDIA_DIR`` (an absolute path must point into it) and fully
resolved, symlinks included, before the containment check, so ``..``, absolute paths
elsewhere and symlinks that lead out are all refused alike (``InvalidMessage``, 400).
A path inside that names no file is ``ModelNotFound`` (404).
"""

from __future__ import annotations

from pathlib import Path

from ..avatars.store import IMAGE_SUFFIXES
from ..errors import InvalidMessage, ModelNotFound

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi"}
AVATAR_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES
MAX_PATH_CHARS = 1024


def media_file(root: Path, rel: str) -> Path:
    """The regular file ``rel`` names inside ``root``, resolved; raise if outside or absent."""
    shown = {"path": rel[:200]}
    if not rel or len(rel) > MAX_PATH_CHARS or "\x00" in rel:
        raise InvalidMessage(f"path must be 1-{MAX_PATH_CHARS} characters", shown)
    try:
        base = root.resolve()
        target = (base / rel).resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        raise InvalidMessage(f"cannot resolve path: {exc.__class__.__name__}", shown) from None
    if not target.is_relative_to(base):
        raise InvalidMessage("path must be inside the server's MEDIA_DIR", shown)
    try:
        found = target.is_file()
    except OSError as exc:  # e.g. a path component over NAME_MAX (found by schemathesis)
        raise InvalidMessage(f"cannot use this path: {exc.strerror or 'invalid'}", shown) from None
    if not found:
        raise ModelNotFound("no such file in MEDIA_DIR", shown)
    return target


def check_suffix(name: str, allowed: set[str] = AVATAR_SUFFIXES) -> str:
    """The lower-case suffix of ``name``; ``InvalidMessage`` unless it is in ``allowed``."""
    suffix = Path(name).suffix.lower()
    if suffix not in allowed:
        raise InvalidMessage(f"unsupported file type {suffix or '(none)'}",
                             {"supported": sorted(allowed)})
    return suffix


__all__ = ["AVATAR_SUFFIXES", "VIDEO_SUFFIXES", "check_suffix", "media_file"]
