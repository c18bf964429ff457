"""Start the service: honours HOST, PORT and every other setting from the environment."""

from __future__ import annotations

import uvicorn

from websocket_service.app import create_app
from websocket_service.config import get_settings
from websocket_service.logs import configure_logging
from websocket_service.serving import uvicorn_config


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()


if __name__ == "__main__":
    main()
