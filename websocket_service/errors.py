"""Domain errors, and the edge table: what each becomes at every edge.

Each class carries its protocol ``code``, its ``http_status`` (REST) and its ``close_code``
(the WebSocket close code when it is fatal on a socket); the transports only ask the error
(``err.http_status``, ``err.close_code``), never compare codes.

=========================  ========================  ====  =====  ==================================
class                      code                      HTTP  close  when
=========================  ========================  ====  =====  ==================================
ServiceError               INTERNAL_ERROR            500   1008   (the base)
InvalidMessage             INVALID_MESSAGE           400   1008   malformed or out-of-range input
 RequestTimeout            INVALID_MESSAGE           408   1008   an HTTP body stalls past BODY_TIMEOUT_S
InvalidSession             INVALID_SESSION           404   1008   no session yet, wrong or duplicate id
InvalidStateTransition     INVALID_STATE_TRANSITION  409   1008   move not in the state table
ModelNotFound              MODEL_NOT_FOUND           404   1008   unknown avatar/action/video, weights
ProcessingError            PROCESSING_ERROR          422   1008   engine or media failure, one request
RateLimitExceeded          RATE_LIMIT_EXCEEDED       429   1013   too much audio, too many sessions
PayloadTooLarge            PAYLOAD_TOO_LARGE         413   1008   an HTTP body over its route's limit
AuthFailed                 AUTH_FAILED               401   1008   wrong or missing token (fatal)
 NotYours                  AUTH_FAILED               403   1008   a valid token, another's (or no) session
InternalError              INTERNAL_ERROR            500   1008   anything unexpected (no details leak)
=========================  ========================  ====  =====  ==================================

``fatal`` says whether the transport closes the connection after reporting it (with
``close_code``: 1008 policy violation, 1013 try again later); a non-fatal error leaves the
socket open. A subclass may change a column (``cluster.front.ServiceUnavailable``: 503, 1013).
"""

from __future__ import annotations

from typing import Any

#: WebSocket close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # a refusal: bad input or credentials, a client not reading
CLOSE_TRY_AGAIN = 1013  # a limit: the same request may succeed later


class ServiceError(Exception):
    code = "INTERNAL_ERROR"
    fatal = False
    http_status = 500
    close_code = CLOSE_POLICY

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
    close_code = CLOSE_TRY_AGAIN


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


#: every error class, for the edge table's test and the docs
ERROR_CLASSES: tuple[type[ServiceError], ...] = (
    InvalidMessage, RequestTimeout, InvalidSession, InvalidStateTransition, ModelNotFound,
    ProcessingError, RateLimitExceeded, PayloadTooLarge, AuthFailed, NotYours, InternalError)

ERROR_CODES = list(dict.fromkeys(cls.code for cls in ERROR_CLASSES))
