"""The shared-secret check behind ``AUTH_TOKEN`` (unset: every endpoint is open).

REST routes depend on :func:`require_token` (an ``Authorization: Bearer`` header); the
WebSocket transports, which browsers cannot give headers, call :func:`check_token` with the
token their protocol carries. Both raise :class:`AuthFailed`, which the edge translates to
401 + ``WWW-Authenticate: Bearer`` (REST) or an error message and close 1008 (WebSockets).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import AuthFailed

# auto_error=False: a missing header reaches require_token, which answers with the service's
# own error body instead of FastAPI's {"detail": ...}.
bearer = HTTPBearer(auto_error=False, description="the server's AUTH_TOKEN, when one is set")

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "AUTH_TOKEN is set and the Bearer token is missing or wrong "
                         "(error body with code AUTH_FAILED)"},
}


def token_matches(expected: str | None, *given: str | None) -> bool:
    """True when no token is configured or any of ``given`` equals it (constant time)."""
    if not expected:
        return True
    want = expected.encode()
    return any(g is not None and hmac.compare_digest(g.encode(), want) for g in given)


def check_token(expected: str | None, *given: str | None) -> None:
    """Raise :class:`AuthFailed` unless :func:`token_matches`."""
    if not token_matches(expected, *given):
        raise AuthFailed("auth token is missing or wrong")


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def require_token(request: Request, credentials: Credentials) -> None:
    """FastAPI dependency: the request must carry ``Authorization: Bearer <AUTH_TOKEN>``."""
    check_token(request.app.state.services.settings.auth_token, bearer_token(credentials))


__all__ = ["UNAUTHORIZED", "Credentials", "bearer", "bearer_token", "check_token",
           "require_token", "token_matches"]
