"""Request bodies are refused before they are read: a pure ASGI middleware.

FastAPI reads (and spools to disk) a request's body before it runs the route's dependencies,
the token check included. This middleware, around every HTTP route, answers first:

* **401** ``AUTH_FAILED`` to a request with a body for a route behind the token
  (:func:`.auth.require_token`) whose ``Authorization`` does not pass, before a byte of the
  body is read;
* **413** ``PAYLOAD_TOO_LARGE`` at once to a declared ``Content-Length`` over the route's
  limit (multipart routes, i.e. avatar uploads: ``MAX_UPLOAD_MB``; every other route:
  ``MAX_BODY_KB``), and to a streamed (chunked) body as soon as it passes the limit;
* **408** (``INVALID_MESSAGE``) when the body stops arriving for ``BODY_TIMEOUT_S``.

Each of these answers carries ``Connection: close``, so uvicorn closes the connection
instead of reading what the client still sends; so does any answer the app gives before it
has read the whole body (e.g. a route that checks the session first), for the same reason.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, NoReturn

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from ..errors import AuthFailed, PayloadTooLarge, RequestTimeout, ServiceError
from .auth import auth_required, authorize, require_token
from .rest import error_response

#: room for a multipart body's boundaries and part headers next to an upload of MAX_UPLOAD_MB
MULTIPART_SLACK = 64 * 1024


@dataclass(frozen=True)
class RouteRule:
    needs_token: bool
    upload: bool


def _depends_on_token(dependant: Dependant) -> bool:
    return any(d.call is require_token or _depends_on_token(d) for d in dependant.dependencies)


def rule_for(route: APIRoute) -> RouteRule:
    """Whether ``route`` is behind the token, and whether it takes an upload (a form body)."""
    body = route.body_field
    upload = body is not None and isinstance(body.field_info, params.Form)
    return RouteRule(_depends_on_token(route.dependant), upload)


def _route_of(scope: Scope) -> APIRoute | None:
    """The route the router chose (it has by the time the app reads the body)."""
    route = scope.get("route")
    if route is None:  # FastAPI versions that do not put it in the scope
        endpoint = scope.get("endpoint")
        route = next((r for r in scope["app"].routes
                      if isinstance(r, APIRoute) and r.endpoint is endpoint), None)
    return route if isinstance(route, APIRoute) else None


class _Refused(Exception):
    pass


class BodyGuard:
    """See the module docstring. Settings come from ``app.state.services`` per request.

    The route is known only once the router has run, so the route's rule is applied at the
    app's first ``receive()``, which FastAPI calls before the route's dependencies and before
    any of the body has been taken from uvicorn (which stops reading the socket at 64 kB)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._rules: dict[int, RouteRule] = {}

    def _rule(self, scope: Scope) -> RouteRule:
        route = _route_of(scope)
        if route is None:
            return RouteRule(False, False)
        rule = self._rules.get(id(route))
        if rule is None:
            rule = self._rules[id(route)] = rule_for(route)
        return rule

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0  # uvicorn's parser refuses those before they get here
        services = getattr(scope["app"].state, "services", None)  # None: not started yet
        if services is None or (b"transfer-encoding" not in headers and declared <= 0):
            await self.app(scope, receive, send)
            return
        settings: Settings = services.settings
        limits = {False: settings.max_body_kb << 10,
                  True: (settings.max_upload_mb << 20) + MULTIPART_SLACK}
        if declared > max(limits.values()):  # over any route's limit: no need to route it
            await _answer(send, _too_large(max(limits.values())))
            return
        await self._guarded(scope, receive, send, declared, limits, settings)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, declared: int,
                       limits: dict[bool, int], settings: Settings) -> None:
        state: dict[str, Any] = {"read": 0, "done": False, "refused": None, "started": False,
                                 "limit": None}
        token = _bearer(dict(scope["headers"]).get(b"authorization"))

        def refuse(err: ServiceError) -> NoReturn:
            state["refused"] = err
            raise _Refused

        def first_receive() -> None:
            rule = self._rule(scope)
            if rule.needs_token and auth_required(settings):
                try:
                    authorize(settings, None, token)
                except AuthFailed as err:
                    refuse(err)
            state["limit"] = limits[rule.upload]
            if declared > state["limit"]:
                refuse(_too_large(state["limit"]))

        async def limited_receive() -> Message:
            if state["done"]:
                return await receive()  # after the body: http.disconnect, whenever it comes
            if state["limit"] is None:
                first_receive()
            try:
                message = await asyncio.wait_for(receive(), settings.body_timeout_s)
            except asyncio.TimeoutError:
                refuse(RequestTimeout(f"the request body stalled for {settings.body_timeout_s:g}"
                                      " s (BODY_TIMEOUT_S)",
                                      {"body_timeout_s": settings.body_timeout_s}))
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["read"] > state["limit"]:
                    refuse(_too_large(state["limit"]))
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"] is not None:  # the app's answer to the cut body is replaced
                if not state["started"]:
                    state["started"] = True
                    await _answer(send, state["refused"])
                return
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["done"]:  # answered without reading it all: do not drain the rest
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _Refused:
            pass
        if state["refused"] is not None and not state["started"]:
            await _answer(send, state["refused"])


def _bearer(value: bytes | None) -> str | None:
    scheme, _, token = (value or b"").decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is over this route's limit of {limit} bytes",
                           {"max_bytes": limit})


async def _answer(send: Send, err: ServiceError) -> None:
    headers = {"Connection": "close"}
    if err.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    response = error_response(err.code, err.message, err.details, err.http_status, headers)
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


__all__ = ["BodyGuard", "MULTIPART_SLACK", "RouteRule", "rule_for"]
