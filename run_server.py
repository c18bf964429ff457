"""Start the service: honours HOST, PORT and every other setting from the environment."""

from __future__ import annotations

import uvicorn

from websocket_service.app import create_app
from websocket_service.config import get_settings
from websocket_service.logs import configure_logging


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, log_config=None, ws_max_size=4 * settings.max_message_bytes,
                ws_per_message_deflate=settings.ws_per_message_deflate,
                ws_ping_interval=20, ws_ping_timeout=20)


if __name__ == "__main__":
    main()
