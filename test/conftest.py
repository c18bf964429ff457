"""Shared fixtures: a real server on a loopback port, with the real default engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from websocket_service.config import Settings
from websocket_service.engines.base import LipSyncEngine

from .live_server import LiveServer, free_port

collect_ignore = ["test_client.py"]  # the CLI test client, not a test module

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (``test/browser.py``), one per test module that asks for it."""
    from .browser import chromium  # noqa: PLC0415 - Playwright only where a test asks

    with chromium() as b:
        yield b


@pytest.fixture(scope="session")
def avatars_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One avatars folder for the run: the built-in avatar is built once and reused."""
    return tmp_path_factory.mktemp("avatars")


@pytest.fixture
def make_server(avatars_root: Path) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def _make(engine_factory: Callable[[Settings], LipSyncEngine] | None = None,
              **overrides: object) -> LiveServer:
        # Tests assert exact speech frame counts, so a stall of the shared CI machine must not
        # trigger the drop-overdue-frames policy; test_ws_overload tests that policy itself.
        # Likewise a client stalled by a busy machine must not end its utterance by the
        # 300 ms gap rule, nor have its pauses' frames dropped to catch up (test_session.py
        # tests both rules on a fake clock).
        values = {"avatars_dir": avatars_root, "port": free_port(), "init_timeout_s": 5.0,
                  "max_speech_lag_frames": 10_000, "speech_gap_ms": 1000,
                  "catch_up_in_pauses": False}
        values.update(overrides)
        settings = Settings(**values)
        server = LiveServer(settings, engine_factory(settings) if engine_factory else None).start()
        servers.append(server)
        return server

    yield _make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server: Callable[..., LiveServer]) -> LiveServer:
    return make_server()
