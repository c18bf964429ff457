"""Which network the WebRTC peers use: ICE servers and host-candidate addresses.

aiortc gathers host candidates through ``aioice.ice.get_host_addresses``, which lists every
interface address *except* 127.0.0.1 and has no configuration hook. We replace that function
once with a wrapper that consults a context variable: inside ``host_addresses([...])`` the
listed addresses are used (so a loopback-only test can say ``["127.0.0.1"]``), elsewhere the
original behaviour is kept. asyncio tasks copy the context when they are created, so the
gathering tasks that ``setLocalDescription`` spawns see the value of their caller only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

_HOSTS: ContextVar[tuple[str, ...] | None] = ContextVar("rtc_host_addresses", default=None)
_original = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _HOSTS.get()
    if chosen is None:
        return _original(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    out = []
    for addr in chosen:
        version = ipaddress.ip_address(addr).version
        if (version == 4 and use_ipv4) or (version == 6 and use_ipv6):
            out.append(addr)
    return out


def install() -> None:
    """Route aioice's host-address lookup through :func:`host_addresses`; idempotent."""
    aioice.ice.get_host_addresses = _get_host_addresses


@contextmanager
def host_addresses(addresses: list[str] | None) -> Iterator[None]:
    """Gather host candidates only on ``addresses`` (all interfaces when empty or None)."""
    install()
    for a in addresses or ():
        ipaddress.ip_address(a)  # fail fast on a typo
    token = _HOSTS.set(tuple(addresses) if addresses else None)
    try:
        yield
    finally:
        _HOSTS.reset(token)


def rtc_configuration(ice_servers: list[dict[str, Any]]) -> RTCConfiguration:
    """An RTCConfiguration with exactly these servers: an empty list contacts none.

    (aiortc falls back to a public STUN server only when ``iceServers`` is None.)
    """
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in ice_servers]
    return RTCConfiguration(iceServers=servers)
