"""Keeping the garbage collector's full passes short in a long-lived serving process."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now into the garbage collector's permanent
    generation (``gc.freeze``); how many objects that is.

    Called once start-up is done (by the app at ready, by the MuseTalk inference process after
    building its core). What start-up made (modules, the engine, avatars, encoded loops; ~250k
    objects with the MuseTalk stand-in) lives as long as the process, and a full collection
    walked all of it with the GIL held: a ~100 ms stall of the event loop and of every media
    thread at once, ~every 30 s at 16 speaking sessions, which made every session miss two or
    three frames (docs/BENCHMARKS.md section 4). A full pass over what is made afterwards takes
    12-19 ms. ``gc.unfreeze()`` gives them back to the collector."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
