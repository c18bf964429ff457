"""The real app served by uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from websocket_service.app import create_app
from websocket_service.config import Settings
from websocket_service.engines.base import LipSyncEngine
from websocket_service.manager import Services
from websocket_service.serving import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving the real app in a background thread."""

    def __init__(self, settings: Settings, engine: LipSyncEngine | None = None,
                 **config_overrides: Any) -> None:
        self.settings = settings
        services = Services(settings, engine=engine) if engine is not None else None
        self.app = create_app(settings, services)
        # the production configuration (websocket_service.serving), on loopback
        config = uvicorn_config(self.app, settings, host="127.0.0.1", log_level="warning",
                                log_config=uvicorn.config.LOGGING_CONFIG, **config_overrides)
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
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (to run a probe on it with ``run_coroutine_threadsafe``)."""
        return self.server.servers[0].get_loop()

    @property
    def services(self) -> Any:
        return self.app.state.services

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.http + path, timeout=10)


MakeServer = Callable[..., LiveServer]
"""The ``make_server`` fixture's type: settings overrides in, a started server out."""


def rtc_server(make_server: MakeServer, token: str, **kw: Any) -> LiveServer:
    """A server behind bearer ``token``, WebRTC on loopback, 256x256 frames."""
    return make_server(auth_token=token, rtc_host_addresses=["127.0.0.1"], default_width=256,
                       default_height=256, **kw)


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """Yield ``http://127.0.0.1:PORT`` (a free port) while the app runs; shut it down after."""
    server = LiveServer(settings.model_copy(update={"port": free_port()})).start()
    try:
        yield server.http
    finally:
        server.stop()
