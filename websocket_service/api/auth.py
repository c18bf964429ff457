"""Who may connect: a shared secret (``AUTH_TOKEN``) and/or signed JWTs (``JWT_SECRET``,
``JWT_PUBLIC_KEY``). With none of them configured every endpoint is open.

A token is accepted when it equals ``AUTH_TOKEN`` (constant-time compare) or is a JWT
signed with the configured key (HS256 with ``JWT_SECRET``; RS256 or ES256 with
``JWT_PUBLIC_KEY``), not expired (``exp`` is required), whose ``sub`` is the user_id it is
used for (REST requests carry no user_id; any valid subject is accepted there).

Authentication gives a :class:`Principal`: a JWT's subject, who may act only on its own
sessions, or the operator (the static ``AUTH_TOKEN``, or no auth configured: the single-tenant
mode), who may act on all. What a principal may do to whose session is decided in
:mod:`.access`.

REST routes depend on :func:`require_token` (an ``Authorization: Bearer`` header); the
WebSocket transports, which browsers cannot give headers, call :func:`authorize` with the
token their protocol carries. Both raise :class:`AuthFailed`, which the edge translates to
401 + ``WWW-Authenticate: Bearer`` (REST) or an error message and close 1008 (WebSockets).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..config import Settings
from ..errors import AuthFailed

# auto_error=False: a missing header reaches require_token, which answers with the service's
# own error body instead of FastAPI's {"detail": ...}.
bearer = HTTPBearer(auto_error=False,
                    description="the server's AUTH_TOKEN or a signed JWT, when either is set")

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "AUTH_TOKEN or JWT keys are set and the Bearer token is missing, "
                         "wrong or expired (error body with code AUTH_FAILED)"},
}

HS_ALGORITHMS = ["HS256"]
PK_ALGORITHMS = ["RS256", "ES256"]


@dataclass(frozen=True)
class Principal:
    """Who a request acts for. ``subject``: a JWT's ``sub``; ``None``: the operator (the
    static ``AUTH_TOKEN``, or auth off), who may act on every session."""

    subject: str | None

    @property
    def operator(self) -> bool:
        return self.subject is None

    def owns(self, user_id: str) -> bool:
        """May act on what ``user_id`` owns (sessions, recordings, figures)."""
        return self.subject is None or self.subject == user_id


OPERATOR = Principal(None)


def token_matches(expected: str | None, *given: str | None) -> bool:
    """True when no token is configured or any of ``given`` equals it (constant time)."""
    if not expected:
        return True
    want = expected.encode()
    return any(g is not None and hmac.compare_digest(g.encode(), want) for g in given)


def auth_required(settings: Settings) -> bool:
    return bool(settings.auth_token or settings.jwt_secret or settings.jwt_public_key)


def _jwt_claims(settings: Settings, token: str) -> dict[str, Any] | None:
    """The claims of ``token`` if it is a valid JWT for one of the configured keys, else None."""
    keys: list[tuple[Any, list[str]]] = []
    if settings.jwt_secret:
        keys.append((settings.jwt_secret, HS_ALGORITHMS))
    if settings.jwt_public_key:
        keys.append((settings.jwt_public_key, PK_ALGORITHMS))
    for key, algorithms in keys:
        try:
            return jwt.decode(token, key, algorithms=algorithms,
                              options={"require": ["exp", "sub"]},
                              leeway=settings.jwt_leeway_s)
        except jwt.ExpiredSignatureError:
            raise AuthFailed("auth token has expired", {"reason": "expired"}) from None
        except jwt.PyJWTError:
            continue  # wrong key or algorithm for this token, or not a JWT at all
    return None


def authorize(settings: Settings, user_id: str | None, *given: str | None) -> Principal:
    """Who ``given`` authenticates, for ``user_id`` (``None``: a request without a user, e.g.
    REST); raise :class:`AuthFailed` unless auth is off or one of ``given`` is acceptable."""
    if not auth_required(settings):
        return OPERATOR
    if settings.auth_token and token_matches(settings.auth_token, *given):
        return OPERATOR
    if settings.jwt_secret or settings.jwt_public_key:
        for token in given:
            if not token:
                continue
            claims = _jwt_claims(settings, token)
            if claims is None:
                continue
            if user_id is not None and claims.get("sub") != user_id:
                raise AuthFailed("the token's subject is not this user_id", {"reason": "subject"})
            return Principal(str(claims["sub"]))
    raise AuthFailed("auth token is missing or wrong")


def origin_allowed(settings: Settings, ws: WebSocket) -> bool:
    """A WebSocket's ``Origin`` is on ``ALLOWED_ORIGINS`` (empty list: any). Clients other than
    browsers send no Origin and are let through: the check stops other sites' pages from
    using a visitor's browser (cross-site WebSocket hijacking), auth does the rest."""
    origin = ws.headers.get("origin")
    return not settings.allowed_origins or origin is None or origin in settings.allowed_origins


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def require_token(request: Request, credentials: Credentials) -> Principal:
    """FastAPI dependency: the request must carry ``Authorization: Bearer <token>``; who it
    authenticates."""
    return authorize(request.app.state.services.settings, None, bearer_token(credentials))


#: a route's parameter: who the request acts for (the token checked once per request)
Caller = Annotated[Principal, Depends(require_token)]


__all__ = ["OPERATOR", "UNAUTHORIZED", "Caller", "Credentials", "Principal", "auth_required", "authorize", "bearer", "bearer_token",
           "origin_allowed", "require_token", "token_matches"]
