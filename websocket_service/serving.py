"""How uvicorn serves the app: one :func:`uvicorn_config`, used by ``run_server.py`` and the
tests' live server alike, so tests exercise the production configuration.

* Proxy headers (``X-Forwarded-For``, ``X-Forwarded-Proto``) are believed only from
  ``TRUSTED_PROXIES``; with none (the default) they are ignored and a client is the address of
  its socket's peer (uvicorn's own default trusts 127.0.0.1, which lets any local client, or
  any client of a proxy that does not set the header, claim any address).
* A connection whose request head is not complete ``HEADER_TIMEOUT_S`` after the connection,
  or after the first byte of a later request on it, is closed (slow loris): uvicorn's own
  keep-alive timeout stops counting at the first byte.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import Settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class _HeadDeadline:
    """A timer on the request head: armed when a head starts, cancelled when it is complete;
    on expiry the connection is closed."""

    head_timeout_s: float = 10.0
    transport: asyncio.Transport
    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


if HttpToolsProtocol is not None:

    class HeadTimeoutHttpTools(_HeadDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol with the request-head deadline."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_head_timer()  # a later request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)


class HeadTimeoutH11(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol with the request-head deadline (where httptools is missing)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        import h11  # noqa: PLC0415 - uvicorn's dependency, only needed here

        if self.conn.their_state is h11.IDLE:  # waiting for (the rest of) a request head
            self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def http_protocol(head_timeout_s: float, impl: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``impl``: auto, httptools or h11) with the head deadline."""
    base: type[_HeadDeadline] = HeadTimeoutH11
    if impl in ("auto", "httptools") and HttpToolsProtocol is not None:
        base = HeadTimeoutHttpTools
    return type(base.__name__, (base,), {"head_timeout_s": head_timeout_s})


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` under ``settings``; ``overrides`` replace options
    (tests: host, log_level; ``http_impl``: "auto", "httptools" or "h11")."""
    impl = overrides.pop("http_impl", "auto")
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "log_config": None, "lifespan": "on",
        "ws_max_size": 4 * settings.max_message_bytes,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        "ws_ping_interval": 20, "ws_ping_timeout": 20,
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": list(settings.trusted_proxies),
        "http": http_protocol(settings.header_timeout_s, impl),
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


__all__ = ["http_protocol", "uvicorn_config"]
