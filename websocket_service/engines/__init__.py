"""Engine selection. Only the MuseTalk module imports torch, and only when chosen."""

from __future__ import annotations

import importlib.util
import logging

from ..config import Settings
from ..errors import ModelNotFound
from .base import SAMPLE_RATE, SAMPLES_PER_FRAME, LipSyncEngine, LipSyncStream, SpeechFrame

log = logging.getLogger(__name__)

__all__ = ["SAMPLE_RATE", "SAMPLES_PER_FRAME", "LipSyncEngine", "LipSyncStream", "SpeechFrame",
           "create_engine", "select_engine"]


def _musetalk(settings: Settings) -> LipSyncEngine:
    missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotFound(
            f"ENGINE=musetalk needs the 'musetalk' extra (missing: {', '.join(missing)}); "
            "install it with: pip install -e '.[musetalk]'",
            {"missing_packages": missing}, fatal=True)
    from .musetalk import MuseTalkEngine  # noqa: PLC0415 - heavy import only when chosen

    engine = MuseTalkEngine(settings)
    engine.load()
    return engine


def create_engine(settings: Settings) -> LipSyncEngine:
    """Build and load the engine named by ``settings.engine``.

    ``musetalk`` fails fast with a clear message when the extra or weights are missing;
    ``auto`` tries MuseTalk and falls back to the weight-free engine.
    """
    return select_engine(settings)[0]


def select_engine(settings: Settings) -> tuple[LipSyncEngine, str | None]:
    """:func:`create_engine`, plus why MuseTalk could not load when ``auto`` fell back
    to the weight-free engine (``None`` when the engine asked for is the one serving)."""
    fallback = None
    if settings.engine in ("musetalk", "auto"):
        try:
            return _musetalk(settings), None
        except (ModelNotFound, ImportError) as exc:
            if settings.engine == "musetalk":
                raise
            log.warning("ENGINE=auto: MuseTalk unavailable (%s); using the weight-free engine", exc)
            fallback = getattr(exc, "message", None) or str(exc)
    from .geometric import GeometricEngine  # noqa: PLC0415

    engine = GeometricEngine(settings)
    engine.load()
    return engine, fallback
