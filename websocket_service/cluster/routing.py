"""Session affinity on Serve's own request routing: a ``RequestRouter`` for the session replicas.

Serve runs one router per caller (each node's HTTP proxy, the REST front's handle) and asks it
for a replica once per request, before the request reaches any replica; a WebSocket is one
request for as long as it is open, so routing costs a socket once, at connect, and nothing per
message or frame. :class:`SessionRouter` reads from each request the session it names:

* Serve's own session key, ``RequestMetadata.session_id``: the ``x-session-id`` header (what a
  non-browser client may send; Serve reads it), or ``handle.options(session_id=...)`` (how the
  REST front forwards ``/sessions/{id}/...``, ``/recordings/{id}``, ``POST /offer`` with a
  ``session_id``, ``/api/webrtc/realtime/stop``);
* else, for a request from the HTTP proxy, its URL: ``/musetalk/v1/bridge/{id}``,
  ``/musetalk/v1/mic/{id}``, or a ``session_id`` query parameter (browsers cannot set headers on
  a WebSocket, so a viewer names the session it watches in the URL, ``?session_id=``, as well as
  in ``INIT.data.viewer``). The proxy hands the router the pickled ASGI scope it will send to the
  replica, so path and query are there at no cost but unpickling it.

A named key goes to the replica that holds it, asked of the registry (:mod:`.registry`), whatever
its load; a key nobody holds, and a request naming none, is a *new session*: it goes to the
replica with the fewest sessions (the registry places it, counting sessions sent there that have
not opened yet, so that a burst spreads across replicas before any of it has reached INIT).

Why not the alternatives Serve 2.60 offers: model multiplexing needs a header (browsers cannot
send one on a WebSocket) and only *prefers* replicas that report the model, seconds after they
load it; the consistent-hash router (``experimental``) maps a key to a replica by hash, but a
session opens wherever there is room, and its id is known only at INIT, after routing;
``record_routing_stats`` reaches routers every few seconds, too late for a viewer that follows
its session's INIT by milliseconds. The registry is told before INIT_SUCCESS leaves the replica.
"""

from __future__ import annotations

import logging
import pickle
import re
from typing import Any
from urllib.parse import parse_qs

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from . import registry

log = logging.getLogger(__name__)

#: the media sockets name their session in the path
_PATH_KEY = re.compile(r"^/musetalk/v1/(?:bridge|mic)/([^/?]+)")
QUERY_KEY = "session_id"


def url_key(path: str, query: bytes | str) -> str | None:
    """The session a URL names: a media socket's path, else ``?session_id=``."""
    if m := _PATH_KEY.match(path):
        return m[1]
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    values = parse_qs(query).get(QUERY_KEY) if query else None
    return values[0] if values else None


def request_key(request: PendingRequest) -> str | None:
    """The session (or recording) ``request`` names, or None for a new session."""
    if request.metadata.session_id:
        return request.metadata.session_id
    if request.args and isinstance(request.args[0], bytes):
        # the HTTP proxy's request: a pickled StreamingHTTPRequest carrying the ASGI scope
        try:
            scope = pickle.loads(request.args[0])._asgi_scope
        except Exception:  # noqa: BLE001 - not the proxy's: no key
            return None
        return url_key(scope.get("path", ""), scope.get("query_string", b""))
    return None


class SessionRouter(ConsistentHashRouter):
    """Affinity by the registry, new sessions to the least loaded replica.

    Built on the consistent-hash router for its routing loop, which routes each pending
    request itself (the base loop may hand a chosen replica to whichever request is next,
    which would break affinity); its hash ring is not used.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._registry: Any = None
        self._placed: set[str] = set()  # requests holding a reservation in the registry
        self._known: set[str] = set()  # the replicas routed to (their tags)

    def initialize_state(self, **kwargs: Any) -> None:
        super().initialize_state(num_virtual_nodes=1, num_fallback_replicas=0)

    def _get_registry(self) -> Any:
        if self._registry is None:
            self._registry = registry.get()
        return self._registry

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas or pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True
        by_tag = {r.replica_id.unique_id: r for r in candidate_replicas}
        try:
            reg = self._get_registry()
            key = request_key(pending_request)
            if key:
                owner = await reg.lookup.remote(key)
                if owner in by_tag:
                    return [[by_tag[owner]]]
            request_id = pending_request.metadata.internal_request_id
            ranked = await reg.place.remote(list(by_tag), request_id)
            self._placed.add(request_id)
        except Exception:  # noqa: BLE001 - no registry (restarting): the least busy replica
            log.warning("session registry unavailable; routing by load", exc_info=True)
            self._registry = None
            return [candidate_replicas]
        return [[by_tag[t]] for t in ranked if t in by_tag] or [candidate_replicas]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        now = {r.unique_id for r in self._replica_id_set}
        self._forget(self._known - now)  # Serve took them out of routing
        self._known = now

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id.unique_id})

    def _forget(self, tags: set[str]) -> None:
        for tag in tags:
            try:
                self._get_registry().forget.remote(tag)
            except Exception:  # noqa: BLE001 - no registry: nothing to forget in
                log.warning("session registry unavailable: replica %s not forgotten", tag)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        if internal_request_id in self._placed:
            self._placed.discard(internal_request_id)
            if self._registry is not None:
                self._registry.settle.remote(internal_request_id)
