"""The two Serve applications: session replicas behind ``/musetalk`` and a REST front.

Every session replica is the whole service in one process (engine, avatars, sessions,
encoders), built by :func:`~websocket_service.app.create_app`, so a session behaves exactly as
on one host. Serve's proxy routes each request once, before it reaches a replica, with
:class:`~.routing.SessionRouter` (session affinity: a request naming a session goes to the
replica that holds it, a new session to the one with the fewest), and counts an open WebSocket
as one ongoing request for as long as it is open:

* ``max_ongoing_requests`` is above every limit of the service's own (:func:`replica_slots`),
  and the proxies' queue is unbounded (``MAX_QUEUED_SESSIONS=-1``): Serve never holds a socket
  back or answers it with an HTTP error; the replica itself refuses what is over its limits
  (``RATE_LIMIT_EXCEEDED``, close 1013), as on one host;
* the autoscaler (``target_ongoing_requests``) counts open sockets;
* a replica chosen for shutdown leaves the routers' replica set at once (no new sessions) and
  Serve waits ``graceful_shutdown_timeout_s`` (``DRAIN_TIMEOUT_S``) for its open sockets before
  the app's shutdown closes what is left;
* ``request_timeout_s`` would cut open sockets too, so it stays unset.

REST, ``/docs`` and ``/metrics`` go to a CPU front (route prefix ``/``) so that they never wait
for a session replica; what needs every replica it gathers with ``DeploymentHandle.broadcast``,
what names a session it forwards through the handle (:mod:`.front`).
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from ..app import create_app
from ..config import Settings
from ..manager import Services
from . import front
from .registry import RegistryPlacement
from .settings import ClusterSettings

SESSION_APP = "avatar-sessions"
FRONT_APP = "avatar"
SESSION_PREFIX = "/musetalk"  # the WebSocket protocol and WebRTC signaling live under it
SESSION_DEPLOYMENT = "SessionReplica"
#: the session replicas' request router (session affinity; :mod:`.routing`)
SESSION_ROUTER = "websocket_service.cluster.routing.SessionRouter"
FRONT_DEPLOYMENT = "RestFront"
#: replica slots for the front's calls (see the module docstring)
CONTROL_SLOTS = 8
#: sockets of a session beside its own: its media bridge and its microphone
MEDIA_SOCKETS = 2
#: viewers' slots when MAX_VIEWERS is 0 (no limit of the service's own)
VIEWER_SLOTS_UNBOUNDED = 1000


class _AtRoot:
    """Serve sets ``root_path`` to the application's route prefix and Starlette then strips it
    from the path; the service's routes already carry ``/musetalk``, so undo that."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            scope = {**scope, "root_path": ""}
        await self.app(scope, receive, send)


@serve.ingress()
class SessionReplica:
    """One session replica: the whole service; :mod:`.front` calls the methods below on each."""

    def __init__(self, settings: Settings) -> None:
        self.services = Services(settings)
        # INIT_SUCCESS carries it, so a client knows which replica serves its session
        self.services.replica_id = serve.get_replica_context().replica_tag
        # the routers send every request naming one of this replica's sessions here
        self.services.sessions.placement = RegistryPlacement(self.services.replica_id)
        ctx = ray.get_runtime_context()
        #: where it runs: its node, and the GPUs Ray gave it (CUDA_VISIBLE_DEVICES)
        self.where = {"node_id": ctx.get_node_id(),
                      "gpus": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}

    def __serve_build_asgi_app__(self) -> ASGIApp:
        self.service_app = create_app(services=self.services)
        return _AtRoot(self.service_app)

    async def sessions(self, subject: str | None = None) -> dict[str, Any]:
        """This replica's part of ``GET /sessions`` (``subject``'s sessions; None: all)."""
        return {**front.replica_sessions(self.services, subject), **self.where}

    async def metrics(self, with_sessions: bool = False) -> dict[str, Any]:
        """This replica's ``GET /metrics`` text."""
        return front.replica_metrics(self.services, with_sessions)

    async def forward(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request the front forwards here (routed by the session or recording it names)."""
        return await front.replica_forward(self.service_app, request)


@serve.ingress()
class RestFront:
    """REST, the OpenAPI docs, the demo page and ``/metrics``, without an engine of its own
    (the weight-free one prepares avatars' frames; each replica adds its engine's analysis
    when it first loads one)."""

    def __init__(self, settings: Settings, target_replicas: int = 1) -> None:
        self.settings = settings
        self.target_replicas = target_replicas

    def __serve_build_asgi_app__(self) -> ASGIApp:
        replicas: DeploymentHandle = serve.get_deployment_handle(SESSION_DEPLOYMENT, SESSION_APP)
        app = create_app(self.settings)
        front.install(app, replicas, self.target_replicas)
        return app


def replica_settings(settings: Settings) -> Settings:
    """Settings shipped to replicas on other machines: absolute paths, nothing from a ``.env``
    that is not there."""
    return settings.model_copy(update={
        "avatars_dir": settings.avatars_dir.resolve(), "model_path": settings.model_path.resolve(),
        "media_dir": settings.media_dir.resolve(),
        "recordings_dir": settings.recordings_dir.resolve()})


def replica_slots(settings: Settings) -> int:
    """Serve's ``max_ongoing_requests`` of a session replica: above every limit of the
    service's own (sessions, their media sockets, viewers, the front's calls), so that the
    replica itself answers each socket, a refusal included, and none waits in a queue."""
    viewers = settings.max_viewers or VIEWER_SLOTS_UNBOUNDED
    return settings.max_sessions * (1 + MEDIA_SOCKETS) + viewers + CONTROL_SLOTS


def build(settings: Settings, cluster: ClusterSettings) -> dict[str, Any]:
    """The two applications, bound: ``{name: (application, route_prefix)}`` for ``serve.run``."""
    settings = replica_settings(settings)
    sessions = serve.deployment(
        name=SESSION_DEPLOYMENT,
        max_ongoing_requests=replica_slots(settings),
        max_queued_requests=cluster.max_queued_sessions,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        # a class path (Serve imports it in each proxy and handle); mypy reads the field's
        # serialised type
        request_router_config=RequestRouterConfig(
            request_router_class=SESSION_ROUTER),  # type: ignore[arg-type]
        graceful_shutdown_timeout_s=cluster.drain_timeout_s,
        graceful_shutdown_wait_loop_s=1.0,
        ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
        **cluster.scaling(settings.max_sessions))(SessionReplica)
    rest_settings = settings.model_copy(update={"engine": "geometric", "encoder_processes": 0})
    rest = serve.deployment(
        name=FRONT_DEPLOYMENT,
        num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})(RestFront)
    return {SESSION_APP: (sessions.bind(settings), SESSION_PREFIX),
            FRONT_APP: (rest.bind(rest_settings, cluster.replicas or cluster.min_replicas), "/")}


def run(settings: Settings, cluster: ClusterSettings) -> None:
    """Deploy both applications at once on the connected Ray cluster (Serve must be started)
    and wait until they run."""
    serve.run_many([serve.RunTarget(application, name=name, route_prefix=prefix)
                    for name, (application, prefix) in build(settings, cluster).items()])
