"""Opening a socket that works on an existing session (microphone out, media bridge).

The same gate for each: the Origin allow-list (before the handshake: a 403), then the token
(``?token=``: the static AUTH_TOKEN, or a JWT whose subject is the session's user), then the
session (:func:`~..api.access.owned_session`: a JWT learns nothing of other users' sessions).
A refusal is one ``ERROR`` envelope and a close with the error's ``close_code`` (1008).
"""

from __future__ import annotations

from fastapi import WebSocket

from ..api.access import owned_session
from ..api.auth import authorize, origin_allowed
from ..errors import CLOSE_POLICY, ServiceError
from ..manager import Services
from ..session import Session
from ..wire import error_message


async def open_session_socket(ws: WebSocket, session_id: str) -> Session | None:
    """Accept ``ws`` for ``session_id``; the session, or None when it was refused (closed)."""
    services: Services = ws.app.state.services
    if not origin_allowed(services.settings, ws):
        await ws.close(code=CLOSE_POLICY)  # before accept: the handshake fails with 403
        return None
    await ws.accept()
    try:
        principal = authorize(services.settings, None, ws.query_params.get("token"))
        session = owned_session(services.sessions, principal, session_id)
    except ServiceError as err:
        await ws.send_text(error_message(err, None).to_json())
        await ws.close(code=err.close_code)
        return None
    return session
