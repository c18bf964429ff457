"""``GET /metrics``: Prometheus text exposition of the service's counters (prometheus-client)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/metrics", tags=["service"], response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Sessions, frames sent/dropped/skipped, speech underruns, audio received, errors, and a
    histogram of the speech latency (audio chunk arrival -> its frame sent)."""
    svc = request.app.state.services
    mgr = svc.sessions
    live = {sid: s.stats for sid, s in mgr.sessions.items()}
    text = mgr.metrics.render(live.values(), svc.settings.max_sessions,
                              {"name": svc.engine.name, **svc.engine.stats()}, live)
    return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)
