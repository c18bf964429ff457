"""Shared fixtures: a real server on a loopback port, with the real default engine."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from websocket_service.app import create_app
from websocket_service.config import Settings
from websocket_service.engines.base import LipSyncEngine
from websocket_service.manager import Services

collect_ignore = ["test_client.py"]  # the CLI test client, not a test module

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving the real app in a background thread."""

    def __init__(self, settings: Settings, engine: LipSyncEngine | None = None) -> None:
        self.settings = settings
        services = Services(settings, engine=engine) if engine is not None else None
        self.app = create_app(settings, services)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning",
                                ws_max_size=4 * settings.max_message_bytes, lifespan="on",
                                ws_per_message_deflate=settings.ws_per_message_deflate)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.settings.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def services(self):  # noqa: ANN201 - the app's Services
        return self.app.state.services

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.http + path, timeout=10)


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
        values = {"avatars_dir": avatars_root, "port": free_port(), "init_timeout_s": 5.0,
                  "max_speech_lag_frames": 10_000}
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
