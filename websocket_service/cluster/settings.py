"""Settings of the Ray Serve deployment, read from the environment like the service's own.

``MAX_SESSIONS``, ``PORT``, ``HOST`` and the rest stay in :class:`~websocket_service.config.
Settings`; these only say how many replicas run where and how they scale and drain.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    #: a fixed number of session replicas (autoscaling off); unset: MIN_/MAX_REPLICAS
    replicas: int | None = Field(None, ge=1)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    #: open sessions per replica the autoscaler aims for, as a share of MAX_SESSIONS
    target_session_share: float = Field(0.75, gt=0, le=1)
    #: scale down only after this long below target: sessions are long, churn is costly
    downscale_delay_s: float = Field(300.0, ge=0)
    #: resources of one session replica: one GPU each in production, none for the CPU engine
    replica_gpus: float = Field(0.0, ge=0)
    replica_cpus: float = Field(1.0, gt=0)
    #: a replica chosen for shutdown takes no new sessions and waits this long for open ones
    drain_timeout_s: float = Field(3600.0, ge=0)
    #: requests that may wait in each proxy to be routed (a burst of new sessions waits there
    #: for a moment); beyond them the proxy answers 503 with Retry-After. -1 (the default): no
    #: bound, as every replica has a slot for every socket its own limits may take, and refuses
    #: the rest itself (RATE_LIMIT_EXCEEDED, close 1013)
    max_queued_sessions: int = Field(-1, ge=-1)
    #: join this Ray cluster instead of starting one on this machine
    ray_address: str | None = None

    @model_validator(mode="after")
    def _range(self) -> ClusterSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("MIN_REPLICAS must not exceed MAX_REPLICAS")
        if self.max_queued_sessions == 0:
            raise ValueError("MAX_QUEUED_SESSIONS must be -1 (no bound) or at least 1")
        return self

    def scaling(self, max_sessions: int) -> dict[str, Any]:
        """``num_replicas`` or ``autoscaling_config`` for the session deployment's options."""
        if self.replicas is not None:
            return {"num_replicas": self.replicas}
        # each open socket holds one max_ongoing_requests slot: Serve counts sockets
        return {"autoscaling_config": {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": max(1.0, self.target_session_share * max_sessions),
            "downscale_delay_s": self.downscale_delay_s}}


@lru_cache
def get_cluster_settings() -> ClusterSettings:
    return ClusterSettings()
