"""Schemathesis against the app's own OpenAPI schema: no REST request ever gets a 500.

Every operation gets generated requests (valid and invalid path parameters, queries and
bodies) against a real server on a loopback port. Bounded: 15 examples per operation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from websocket_service.config import Settings

from .live_server import LiveServer, free_port


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("rest-fuzz")
    (root / "media").mkdir()
    settings_ = Settings(avatars_dir=root / "avatars", media_root=root / "media",
                         port=free_port(), max_prepare_seconds=2.0)
    server = LiveServer(settings_).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http_session() -> Iterator[requests.Session]:
    """One HTTP session for every call, closed at the end (no sockets left to the GC)."""
    with requests.Session() as session:
        yield session


# the exported schema, which test_rest keeps identical to the app's /openapi.json
schema = schemathesis.openapi.from_path(Path(__file__).parents[1] / "openapi.yaml")


@schema.parametrize()
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: schemathesis.Case, api_server: LiveServer,
                                        http_session: requests.Session) -> None:
    response = case.call(base_url=api_server.http, session=http_session, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    assert "Traceback" not in response.text and Path(__file__).parent.as_posix() not in response.text
