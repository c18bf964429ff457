"""Who may do what to whose session: the one place that decides.

A session belongs to its user (the ``user_id`` it was opened for, which a JWT's ``sub`` must
match). A request acts for a :class:`~.auth.Principal`:

* a JWT's subject acts on its own sessions only: their controls, media sockets (bridge, mic),
  viewers, recordings and figures. Another user's session, and a session that does not exist,
  get the same answer, :class:`~..errors.NotYours` (``AUTH_FAILED``, HTTP 403, close 1008):
  the caller learns nothing, not even that the id exists;
* the operator (the static ``AUTH_TOKEN``, or no auth configured: the single-tenant mode) acts
  on every session, and an unknown id is a plain 404 / ``INVALID_SESSION``;
* a *view grant* lets anyone who holds it watch one session, receive-only (broadcast): its
  owner asks for the token (``POST /sessions/{id}/view_token``) and hands it out; a viewer
  presents it where it would present its auth token. It ends with the session or on
  ``DELETE /sessions/{id}/view_token``.

The table of who may do what is in the protocol spec (``musetalk_websocket_spec.md``,
"Authentication and authorisation").
"""

from __future__ import annotations

from ..config import Settings
from ..errors import AuthFailed, NotYours
from ..manager import SessionManager
from ..session import Session
from .auth import Principal, authorize


def owned_session(sessions: SessionManager, principal: Principal, session_id: str) -> Session:
    """The session ``principal`` may act on, or NotYours (InvalidSession for the operator)."""
    if principal.operator:
        return sessions.get(session_id)
    session = sessions.sessions.get(session_id)
    if session is None or session.user_id != principal.subject:
        raise NotYours(session_id)
    return session


def viewable_session(settings: Settings, sessions: SessionManager, session_id: str,
                     user_id: str | None, *tokens: str | None) -> Session:
    """The session a viewer may watch: with its view grant among ``tokens``, or as a
    principal that owns it (``tokens`` authenticate ``user_id``; raises AuthFailed)."""
    if sessions.view_granted(session_id, *tokens):
        return sessions.get(session_id)
    return owned_session(sessions, authorize(settings, user_id, *tokens), session_id)


def check_user(principal: Principal, user_id: str) -> None:
    """``principal`` may open a session for ``user_id`` (a JWT: only for its own subject)."""
    if not principal.owns(user_id):
        raise AuthFailed("the token's subject is not this user_id", {"reason": "subject"})


__all__ = ["check_user", "owned_session", "viewable_session"]
