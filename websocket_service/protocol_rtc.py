"""WebRTC signaling messages: ``POST /offer`` and the socket ``/musetalk/v1/rtc/{user_id}``.

Unlike the protocol's envelopes (:mod:`.protocol`) these are flat, lower-case JSON objects
(``{"type": "offer", "sdp": ...}``), as browsers' WebRTC examples write them. The client's are
parsed through one discriminated union (:data:`SIGNAL_ADAPTER`); the server's are built here
and sent as :meth:`SignalMessage.to_json`. The session's own events reach a signaling socket
as protocol envelopes (:class:`.protocol.ServerMessage`). Documented in
``musetalk_websocket_spec.md`` (section 10); keep both in step.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .protocol import ServerMessage
from .units import ID_PATTERN

MAX_SIGNAL_BYTES = 64 * 1024

ID = Field(None, pattern=ID_PATTERN)
TOKEN = Field(None, max_length=1024, description="the server's AUTH_TOKEN, when one is set")
VIEW = Field(None, pattern=ID_PATTERN,
             description="view this running session (receive-only) instead of opening one")


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ------------------------------------------------------------------ client -> server

class Offer(_Msg):
    """An SDP offer: the body of ``POST /offer`` (the aiortc examples' convention plus who is
    asking) and the signaling socket's ``offer`` (whose user is the socket's URL's)."""

    type: Literal["offer"] = "offer"
    sdp: str = Field(..., max_length=MAX_SIGNAL_BYTES)
    user_id: str | None = Field(None, pattern=ID_PATTERN,
                                description="who opens a new session (POST /offer: required "
                                            "unless session_id; the socket: its URL's)")
    session_id: str | None = VIEW
    avatar_id: str | None = ID
    base_video: str | None = Field(None, max_length=64)
    auth_token: str | None = TOKEN


class SigCandidate(_Msg):
    type: Literal["ice-candidate"]
    candidate: dict[str, Any] | None = None  # RTCIceCandidateInit; null = end of candidates


class SigPing(_Msg):
    type: Literal["ping"]
    t: float | None = None


class SigBye(_Msg):
    type: Literal["bye"]


SIGNAL_TYPES = ["offer", "ice-candidate", "ping", "bye"]
#: parses a signaling socket's text frame in one pass (``validate_json``)
SIGNAL_ADAPTER: TypeAdapter[Any] = TypeAdapter(
    Annotated[Offer | SigCandidate | SigPing | SigBye, Field(discriminator="type")])


# ------------------------------------------------------------------ server -> client

class SignalMessage(_Msg):
    """A message from the server on the signaling socket (flat: every field at the top)."""

    def to_json(self) -> str:
        return self.model_dump_json()


class OfferAnswer(SignalMessage):
    """The answer, with every server candidate: ``POST /offer``'s body and the socket's."""

    type: Literal["answer"] = "answer"
    sdp: str
    session_id: str
    viewer: bool = False


class SigPong(SignalMessage):
    type: Literal["pong"] = "pong"
    t: float | None
    server_time_ms: int


class SigConnected(SignalMessage):
    """Media is flowing (the peer connection is ``connected``)."""

    type: Literal["connected"] = "connected"
    session_id: str


class SigDisconnected(SignalMessage):
    """The peer and its session are gone."""

    type: Literal["disconnected"] = "disconnected"
    session_id: str
    reason: str


class SigError(SignalMessage):
    type: Literal["error"] = "error"
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


#: what a signaling socket sends: its own messages and the session's envelopes
Outgoing = SignalMessage | ServerMessage
