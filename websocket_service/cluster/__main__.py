"""``python -m websocket_service.cluster``: the service on Ray Serve (scripts/serve_cluster.sh).

SIGTERM or Ctrl-C: drain (the session replicas take no new sessions and wait up to
``DRAIN_TIMEOUT_S`` for their open ones), then stop Serve, and Ray if this process started it.
A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from ..config import get_settings
from . import runner
from .settings import get_cluster_settings

log = logging.getLogger("websocket_service.cluster")


def main() -> None:
    settings, cluster = get_settings(), get_cluster_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _on_signal(signum: int, _: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # the second signal: do not wait for the drain
        log.info("signal %d: draining, then shutting down (again to stop at once)", signum)
        stop.set()

    started = runner.start_ray(cluster)
    # after ray.init, which installs a SIGTERM handler of its own that exits at once
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        runner.deploy(settings, cluster)
        while not stop.wait(1.0):
            pass
        runner.drain_sessions()
        log.info("drained; shutting down")
    except KeyboardInterrupt:
        log.info("stopping without waiting for open sessions")
    finally:
        runner.shutdown(started)


if __name__ == "__main__":
    main()
