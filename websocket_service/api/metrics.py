"""``GET /metrics``: Prometheus text exposition of the service's counters (prometheus-client).

Per-session gauges name session ids, which are other users' business: they are in the
exposition only when ``/metrics`` is protected (``METRICS_TOKEN`` set, and the scrape sends it
as its Bearer token) or when no auth is configured at all (single-tenant, nothing to hide).
With ``METRICS_TOKEN`` set, a scrape without it is refused (401).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Settings
from ..errors import AuthFailed
from .auth import Credentials, auth_required, bearer_token, token_matches

router = APIRouter()


def session_gauges_allowed(settings: Settings, credentials: Credentials) -> bool:
    """May this scrape see per-session gauges? Raises AuthFailed for a wrong METRICS_TOKEN."""
    if settings.metrics_token:
        if not token_matches(settings.metrics_token, bearer_token(credentials)):
            raise AuthFailed("GET /metrics needs METRICS_TOKEN as its Bearer token")
        return True
    return not auth_required(settings)


@router.get("/metrics", tags=["service"], response_class=PlainTextResponse)
async def metrics(request: Request, credentials: Credentials) -> PlainTextResponse:
    """Sessions, frames sent/dropped/skipped, speech underruns, audio received, errors, and a
    histogram of the speech latency (audio chunk arrival -> its frame sent); gauges per
    session only when allowed (module docstring)."""
    svc = request.app.state.services
    mgr = svc.sessions
    live = {sid: s.stats for sid, s in mgr.sessions.items()}
    by_id = live if session_gauges_allowed(svc.settings, credentials) else None
    text = mgr.metrics.render(live.values(), svc.settings.max_sessions,
                              {"name": svc.engine.name, **svc.engine.stats()}, by_id)
    return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)
