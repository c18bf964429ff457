"""Shared, process-cached setup for the geometric engine tests (built once per run)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

from bench.run_stream import read_wav
from websocket_service.avatars.model import Avatar
from websocket_service.avatars.store import AvatarStore
from websocket_service.config import Settings
from websocket_service.engines.geometric import GeometricEngine

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@cache
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="geometric-test-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def engine() -> GeometricEngine:
    eng = GeometricEngine(Settings())
    eng.load()
    return eng


@cache
def store() -> AvatarStore:
    return AvatarStore(workdir() / "avatars", 512, 512, 25, engine().prepare_avatar)


@cache
def builtin() -> Avatar:
    return store().ensure_builtin("default")


@cache
def wav(name: str) -> np.ndarray:
    return read_wav(FIXTURES / name)
