"""Start or join Ray, run Serve's proxy and deploy both applications; tear down what started.

Shared by ``python -m websocket_service.cluster`` and the tests.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray import serve

from ..config import Settings
from . import deployments, registry
from .settings import ClusterSettings

log = logging.getLogger(__name__)


def start_ray(cluster: ClusterSettings, **init: Any) -> bool:
    """Join ``RAY_ADDRESS``, or start Ray on this machine bound to loopback only (no dashboard);
    True when this process started it (and so must stop it)."""
    if cluster.ray_address:
        ray.init(address=cluster.ray_address, **init)
        return False
    # Ray's own services (GCS, raylet, workers) stay on 127.0.0.1 (see the package's
    # __init__): only Serve's proxy listens on HOST. A multi-machine cluster is started with
    # `ray start` and joined instead.
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **init)
    return True


def deploy(settings: Settings, cluster: ClusterSettings) -> None:
    """Start Serve's HTTP proxy on ``HOST:PORT`` and run both applications."""
    registry.start(reservation_ttl_s=settings.init_timeout_s)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    deployments.run(settings, cluster)
    log.info("ready to take sessions on %s:%d (GET /health says ready): %s", settings.host,
             settings.port, sorted(serve.status().applications.keys()))


def drain_sessions(poll_s: float = 1.0) -> None:
    """Delete the session application and wait until it is gone: new sockets find no route at
    once, while each replica lets its open sessions finish (up to ``DRAIN_TIMEOUT_S``) before
    it stops. The proxy stays up meanwhile: stopping Serve would cut every open socket."""
    serve.delete(deployments.SESSION_APP, _blocking=False)
    while deployments.SESSION_APP in serve.status().applications:
        time.sleep(poll_s)


def shutdown(started_ray: bool) -> None:
    """Stop Serve (what is still open is cut), and Ray when this process started it."""
    try:
        serve.shutdown()
        registry.stop()
    finally:
        if started_ray:
            ray.shutdown()
