"""Scale out on Ray Serve: sessions spread over replicas of the whole service.

The only package that imports ``ray``; the service itself imports and runs without it.

* ``settings``: the cluster's own settings (replicas, autoscaling, GPUs, draining).
* ``deployments``: the session deployment (one replica per GPU, WebSockets under
  ``/musetalk``) and the REST front (everything else), and :func:`build` that binds both.
* ``front``: the REST front's routes that need every replica (``/sessions``, ``/metrics``,
  ``/recordings``) or the one that holds a session (forwarded through the handle).
* ``routing``: the session replicas' Serve request router (session affinity), and
  ``registry``: the named actor that knows which replica holds each session.
* ``__main__``: ``python -m websocket_service.cluster`` starts Ray (or joins ``RAY_ADDRESS``),
  deploys both applications and shuts down what it started on SIGTERM or Ctrl-C.
"""

import os

if not os.environ.get("RAY_ADDRESS"):
    # A Ray started on this machine keeps every one of its servers on 127.0.0.1 (only Serve's
    # proxy listens on HOST). Ray reads this when it is imported, hence here, before any
    # module of this package imports it. Joining a cluster (RAY_ADDRESS) leaves it alone.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
