"""Write openapi.yaml from the app's schema: `python -m scripts.export_openapi`."""

from __future__ import annotations

from pathlib import Path

from websocket_service.api.rest import openapi_text
from websocket_service.app import create_app
from websocket_service.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    text = openapi_text(create_app(Settings()).openapi())
    (ROOT / "openapi.yaml").write_text(text)
    print(f"wrote {ROOT / 'openapi.yaml'} ({len(text)} bytes)")


if __name__ == "__main__":
    main()
