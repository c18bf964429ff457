"""Domain errors. Each carries a protocol code; only transports translate them.

ServiceError
 ├── InvalidMessage          INVALID_MESSAGE        malformed or out-of-range client input
 │    └── RequestTimeout     INVALID_MESSAGE        an HTTP body that stalls past BODY_TIMEOUT_S (408)
 ├── InvalidSession          INVALID_SESSION        no session yet, wrong session_id, duplicate id
 ├── InvalidStateTransition  INVALID_STATE_TRANSITION  move not in the state table
 ├── ModelNotFound           MODEL_NOT_FOUND        unknown avatar/action/base video, missing weights
 ├── ProcessingError         PROCESSING_ERROR       engine or media failure for one request
 ├── RateLimitExceeded       RATE_LIMIT_EXCEEDED    too much buffered audio, too many sessions
 ├── PayloadTooLarge         PAYLOAD_TOO_LARGE      an HTTP body over its route's limit (413)
 ├── AuthFailed              AUTH_FAILED            wrong or missing token (fatal, 401)
 │    └── NotYours           AUTH_FAILED            a valid token, someone else's (or no) session (403)
 └── InternalError           INTERNAL_ERROR         anything unexpected (details never leak)

``fatal`` says whether the transport should close the connection after reporting it.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    code = "INTERNAL_ERROR"
    fatal = False
    http_status = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None, *, fatal: bool | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if fatal is not None:
            self.fatal = fatal


class InvalidMessage(ServiceError):
    code = "INVALID_MESSAGE"
    http_status = 400


class RequestTimeout(InvalidMessage):
    """An HTTP request body that stops arriving for ``BODY_TIMEOUT_S``."""

    http_status = 408


class PayloadTooLarge(ServiceError):
    """An HTTP request body over its route's limit (``MAX_UPLOAD_MB``, ``MAX_BODY_KB``)."""

    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class InvalidSession(ServiceError):
    code = "INVALID_SESSION"
    http_status = 404


class InvalidStateTransition(ServiceError):
    code = "INVALID_STATE_TRANSITION"
    http_status = 409


class ModelNotFound(ServiceError):
    code = "MODEL_NOT_FOUND"
    http_status = 404


class ProcessingError(ServiceError):
    code = "PROCESSING_ERROR"
    http_status = 422


class RateLimitExceeded(ServiceError):
    code = "RATE_LIMIT_EXCEEDED"
    http_status = 429


class AuthFailed(ServiceError):
    code = "AUTH_FAILED"
    fatal = True
    http_status = 401


class NotYours(AuthFailed):
    """A valid token naming a session that is not its user's. The same answer for a session
    that does not exist, so that another user learns nothing, not even that the id exists."""

    http_status = 403

    def __init__(self, ident: str, kind: str = "session") -> None:
        super().__init__(f"no {kind} {ident[:64]} of this user",
                         {f"{kind}_id": ident[:64], "reason": "not_owner"})


class InternalError(ServiceError):
    code = "INTERNAL_ERROR"
    http_status = 500


ERROR_CODES = [
    cls.code
    for cls in (InvalidMessage, InvalidSession, InvalidStateTransition, ModelNotFound,
                ProcessingError, RateLimitExceeded, PayloadTooLarge, AuthFailed, InternalError)
]
