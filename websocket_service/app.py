"""The FastAPI application: REST, the WebSocket protocol and the static demo page."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from . import __version__
from .api import management, metrics, rest, session_control
from .api.body_guard import BodyGuard
from .config import Settings, get_settings
from .errors import ServiceError
from .gc_pauses import freeze_startup_objects
from .loop_lag import LoopLag
from .manager import Services
from .media import threads as media_threads
from .transports import recording, signaling, websocket
from .wire import explain_invalid

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

DESCRIPTION = """Real-time talking-avatar streaming.

Connect a WebSocket to `/musetalk/v1/ws/{user_id}` and speak the public MuseTalk protocol
(v1.0/v1.1; every message an envelope `{"type", "session_id", "data"}`, specified in
`musetalk_websocket_spec.md`) to receive a continuous 25 fps H.264 stream. REST covers
health, sessions and avatars."""


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """Build the app. Tests pass ``settings`` or ready ``services``; production uses neither."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = services if services is not None else await asyncio.to_thread(
            Services, settings or get_settings())
        media_threads.configure(svc.settings.media_threads, svc.settings.opencv_threads)
        await svc.build_idle_loops(await asyncio.to_thread(svc.ensure_default_avatar))
        if svc.encoders is not None:
            await svc.encoders.start()
        app.state.services = svc
        app.state.loop_lag.start()
        for hook in app.state.startup_hooks:
            await hook(app)
        frozen = freeze_startup_objects()
        log.info("ready: engine=%s avatar=%s (%d objects of start-up left out of the garbage "
                 "collector's full passes)", svc.engine.name, svc.settings.default_avatar, frozen)
        try:
            yield
        finally:
            gc.unfreeze()  # a process that starts the app again (tests) collects them again
            for hook in app.state.shutdown_hooks:
                await hook(app)
            await app.state.loop_lag.stop()
            await svc.aclose()

    cfg = settings or (services.settings if services else get_settings())
    app = FastAPI(title="MuseTalk real-time avatar service", version=__version__,
                  description=DESCRIPTION, lifespan=lifespan)
    app.state.startup_hooks = []
    app.state.loop_lag = LoopLag()
    app.state.shutdown_hooks = []
    app.add_middleware(BodyGuard)  # inside CORS: its early 401/413 answers carry CORS headers
    app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["*"],
                       allow_headers=["*"])

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        return rest.error_response(exc.code, exc.message, exc.details, exc.http_status, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Explained as on the sockets, answered as its class says (400 INVALID_MESSAGE)."""
        return await _service_error(request, explain_invalid(None, exc.errors(), expected_types=()))

    schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # FastAPI's own, once: then it says what we answer
            rest.invalid_requests_are_400(schema())
        return app.openapi_schema or schema()

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # open routers (health, metrics, OpenAPI, samples) and those behind AUTH_TOKEN (api.auth)
    for r in (rest.public, metrics.router, rest.router, session_control.public,
              session_control.router, management.router):
        app.include_router(r)
    signaling.install(app)
    websocket.install(app)
    recording.install(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
