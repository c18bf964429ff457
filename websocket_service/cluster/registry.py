"""Where each session lives: a named Ray actor that the replicas tell and the routers ask.

A replica *claims* a key (a session id when the session opens, a recording id when a recording
starts) before it answers the client, and *releases* a session's key when it closes; the
routers (:mod:`.routing`) look a key up to send every request that names it to that replica,
and ask :meth:`SessionRegistry.place` where a new session should go: the replica with the
fewest sessions, counting the ones just sent there that have not opened yet (*reservations*),
so that a burst spreads before any of it has reached ``INIT``.

One actor per cluster (``get_if_exists``): its calls are handled one at a time, so two proxies
placing at once see each other's reservations. It holds no session state that a replica does
not also hold: if it restarts, routing falls back to placement until replicas claim again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from typing import Any

import ray

log = logging.getLogger(__name__)

REGISTRY_NAME = "avatar-session-registry"
REGISTRY_NAMESPACE = "avatar-cluster"
#: recording ids kept
MAX_RECORDINGS = 10_000


class SessionRegistry:
    """Session and recording ids -> the replica (``replica_tag``) that holds them."""

    def __init__(self, reservation_ttl_s: float = 10.0) -> None:
        self.ttl = reservation_ttl_s
        #: live sessions per replica
        self.sessions: dict[str, set[str]] = {}
        #: live sessions' replicas
        self.owner: dict[str, str] = {}
        #: recordings: their replica and description (status "recording" until finished);
        #: bounded, the oldest dropped
        self.recordings: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        #: replica -> {request id: expiry} of new sessions sent there, not opened yet
        self.reserved: dict[str, dict[str, float]] = {}

    def claim(self, replica: str, key: str, recording: dict[str, Any] | None = None) -> None:
        """``replica`` holds ``key`` from now on (a session's claim settles a reservation)."""
        if recording is not None:
            self.recordings[key] = (replica, recording)
            while len(self.recordings) > MAX_RECORDINGS:
                self.recordings.popitem(last=False)
            return
        self.owner[key] = replica
        self.sessions.setdefault(replica, set()).add(key)
        pending = self.reserved.get(replica)
        if pending:
            del pending[min(pending, key=pending.__getitem__)]  # the oldest

    def release(self, replica: str, key: str) -> None:
        """A session closed (nothing routes by its id any more), or a recording finished."""
        if key in self.recordings:
            self.recordings[key][1].update(status="done", reason=None)
            return
        self.sessions.get(replica, set()).discard(key)
        if self.owner.get(key) == replica:
            del self.owner[key]

    def lookup(self, key: str) -> str | None:
        if key in self.owner:
            return self.owner[key]
        return self.recordings[key][0] if key in self.recordings else None

    def place(self, candidates: list[str], request_id: str) -> list[str]:
        """``candidates`` (live replicas) from the best place for a new session to the worst:
        fewest sessions plus reservations first, ties at random; reserves a place on the first
        until the session claims it, the request ends (:meth:`settle`) or the TTL passes."""
        now = time.monotonic()
        for pending in self.reserved.values():
            for rid in [r for r, expiry in pending.items() if expiry < now]:
                del pending[rid]
        ranked = sorted(candidates, key=lambda r: (self.load(r), random.random()))
        if ranked:
            self.reserved.setdefault(ranked[0], {})[request_id] = now + self.ttl
        return ranked

    def settle(self, request_id: str) -> None:
        """The request that reserved a place ended: drop its reservation if still there."""
        for pending in self.reserved.values():
            pending.pop(request_id, None)

    def load(self, replica: str) -> int:
        return len(self.sessions.get(replica, ())) + len(self.reserved.get(replica, ()))

    def forget(self, replica: str) -> None:
        """Serve took ``replica`` out of routing (it died, or it drains): its sessions are
        no longer reachable by id, and a recording it had not finished is marked failed, not
        lost silently (a draining replica that finishes it after all makes it done)."""
        for key in self.sessions.pop(replica, set()):
            self.owner.pop(key, None)
        self.reserved.pop(replica, None)
        for held, info in self.recordings.values():
            if held == replica and info.get("status") == "recording":
                info.update(status="failed", reason="replica_lost")

    def recording(self, key: str) -> dict[str, Any] | None:
        """A recording's description as its replica last told (status failed: lost with it)."""
        return self.recordings[key][1] if key in self.recordings else None

    def failed_recordings(self) -> list[dict[str, Any]]:
        return [info for _, info in self.recordings.values() if info.get("status") == "failed"]

    def snapshot(self) -> dict[str, Any]:
        """Sessions and reservations per replica (tests, debugging)."""
        return {r: {"sessions": sorted(s), "reserved": len(self.reserved.get(r, ()))}
                for r, s in self.sessions.items()}


class RegistryPlacement:
    """A replica's side (:class:`~websocket_service.manager.Placement`): tells the registry
    what it holds. A registry that does not answer costs affinity, never the session."""

    def __init__(self, replica: str, timeout_s: float = 5.0) -> None:
        self.replica = replica
        self.timeout_s = timeout_s
        self._registry: Any = None

    async def _call(self, method: str, *args: Any) -> None:
        try:
            if self._registry is None:
                self._registry = get()
            await asyncio.wait_for(getattr(self._registry, method).remote(self.replica, *args),
                                   self.timeout_s)
        except Exception:  # noqa: BLE001 - logged; the session goes on
            self._registry = None
            log.warning("session registry: %s%r failed", method, args, exc_info=True)

    async def claim(self, key: str, recording: dict[str, Any] | None = None) -> None:
        await self._call("claim", key, recording)

    async def release(self, key: str) -> None:
        await self._call("release", key)


def start(reservation_ttl_s: float) -> Any:
    """The cluster's registry actor, created unless it runs (the deploying driver owns it; it
    must outlive the applications, hence detached, and :func:`stop` ends it)."""
    return ray.remote(SessionRegistry).options(
        name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, max_restarts=-1).remote(reservation_ttl_s)


def get() -> Any:
    return ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)


def stop() -> None:
    try:
        ray.kill(get())
    except ValueError:
        pass  # none running
