"""The one place where domain frames, events and errors become protocol messages, and
where refused input is explained.

Transports call these and only move the text. :func:`explain_invalid` is the one
explanation of input that failed validation, for every socket and for REST.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic_core
from pydantic import ValidationError

from .avatars.model import VideoNames
from .errors import InvalidMessage, ServiceError
from .events import ActionTriggered, ClosedByClient, SessionEvent, SpeechEnded, StateChanged
from .playout import OutputFrame
from .protocol import (
    CLIENT_TYPES,
    ActionFrameData,
    ActionTriggeredData,
    CloseAckData,
    ErrorData,
    ServerMessage,
    SpeechEndedData,
    StateChangedData,
    VideoFrameData,
    flat_fields,
)
from .protocol_rtc import SigError


def frame_message(session_id: str, frame: OutputFrame, data: str, keyframe: bool,
                  names: VideoNames) -> str:
    """VIDEO_FRAME, or ACTION_FRAME for an action requested in the v1.0 form: the one place
    that builds them.

    ``data`` is the access unit in base64 (:func:`b64`). Encoded media is bytes up to here:
    only the WebSocket edge calls this (once per packet, the text shared by its readers; see
    :class:`.feed.Item`).
    """
    speech_ts = frame.audio_ms if frame.utterance_id is not None else None
    ts = speech_ts if speech_ts is not None else frame.timestamp_ms
    body: ActionFrameData | VideoFrameData
    if frame.legacy_action and frame.action:
        body = ActionFrameData(frame_data=data, frame_timestamp=ts,
                               action_progress=round(frame.progress, 4),
                               action_type=names.public(frame.action), frame_index=frame.index,
                               keyframe=keyframe, utterance_id=frame.utterance_id,
                               utterance_frame=frame.utterance_frame)
        return ServerMessage(type="ACTION_FRAME", session_id=session_id, data=body).to_json()
    body = VideoFrameData(frame_data=data, frame_timestamp=ts, frame_index=frame.index,
                          keyframe=keyframe, state=frame.state,
                          base_video=names.public(frame.clip),
                          utterance_id=frame.utterance_id, utterance_frame=frame.utterance_frame)
    return ServerMessage(type="VIDEO_FRAME", session_id=session_id, data=body).to_json()


def b64(packet: bytes) -> str:
    """An access unit as the protocol's ``frame_data`` carries it."""
    return base64.b64encode(packet).decode("ascii")


def event_message(session_id: str | None, event: SessionEvent | ServiceError,
                  names: VideoNames | None) -> ServerMessage:
    """The message for a session event or an error."""
    if isinstance(event, ServiceError):
        return error_message(event, session_id)
    public = names.public if names is not None else str
    if isinstance(event, StateChanged):
        return ServerMessage(type="STATE_CHANGED", session_id=session_id, data=StateChangedData(
            current_state=event.current, current_video=public(event.clip),
            previous_state=event.previous))
    if isinstance(event, SpeechEnded):
        return ServerMessage(type="SPEECH_ENDED", session_id=session_id, data=SpeechEndedData(
            utterance_id=event.utterance_id, frames=event.frames, skipped=event.skipped,
            interrupted=event.interrupted))
    if isinstance(event, ActionTriggered):
        name = public(event.clip)
        return ServerMessage(type="ACTION_TRIGGERED", session_id=session_id, data=ActionTriggeredData(
            action_index=int(name.rsplit("_", 1)[-1]) if name.startswith("action_") else 0,
            action_type=name, frames=event.frames))
    if isinstance(event, ClosedByClient):
        return ServerMessage(type="CLOSE_ACK", session_id=session_id,
                             data=CloseAckData(reason=event.reason))
    raise TypeError(f"no message for {type(event).__name__}")


def error_message(err: ServiceError, session_id: str | None) -> ServerMessage:
    return ServerMessage(type="ERROR", session_id=session_id,
                         data=ErrorData(code=err.code, message=err.message, details=err.details))


def signaling_error(err: ServiceError) -> SigError:
    """An error on the signaling socket (its own flat, lower-case protocol)."""
    return SigError(code=err.code, message=err.message, details=err.details)


# ------------------------------------------------------------------ client input errors

def check_envelope(raw: Any, expected_types: Sequence[str] = CLIENT_TYPES) -> None:
    """Refuse what is not an envelope, with a message that says how to wrap it."""
    if not isinstance(raw, dict):
        raise InvalidMessage("a message is a JSON object {\"type\", \"session_id\", \"data\"}",
                             {"expected_types": list(expected_types)})
    stray = flat_fields(raw)
    if stray:
        raise InvalidMessage(
            f"messages are envelopes {{\"type\", \"session_id\", \"data\": {{...}}}}: move "
            f"{', '.join(stray[:8])} into \"data\"",
            {"move_into_data": stray[:8], "example": {"type": raw.get("type"),
                                                      "session_id": "<session id>",
                                                      "data": {k: "..." for k in stray[:3]}}})


def parse_json(text: str | bytes) -> Any:
    """``text`` parsed with the same bounds as the message models' own parser (nesting depth,
    number size); InvalidMessage saying what is wrong when it is not JSON within them."""
    try:
        return pydantic_core.from_json(text)
    except ValueError as exc:  # e.g. "recursion limit exceeded", "number out of range"
        raise InvalidMessage(f"message is not valid JSON: {str(exc)[:120]}") from None


def explain_invalid(raw: Any, exc: ValidationError | Sequence[Mapping[str, Any]], *,
                    expected_types: Sequence[str] = CLIENT_TYPES,
                    envelope: bool = True) -> InvalidMessage:
    """Why input that failed validation was refused: the one explanation, for every socket
    (protocol, signaling, bridge) and for REST (``exc``: FastAPI's ``errors()`` list).

    ``raw`` is the input (None when not at hand): a text frame is parsed again (the error path
    only) to say it is not JSON (or nested too deep, a number too long), or, for ``envelope``
    protocols, not an envelope (with how to wrap it). Then an unknown or missing ``type``
    (``details.expected_types``), or the first bad field (``details.errors``: at most ten
    ``{field, problem}``; a field's path leaves out the message's type).
    """
    if isinstance(raw, (str, bytes)):
        try:
            raw = parse_json(raw)
            if envelope:
                check_envelope(raw, expected_types)
        except InvalidMessage as err:
            return err
    errors = exc.errors(include_url=False, include_input=False, include_context=False) \
        if isinstance(exc, ValidationError) else list(exc)
    first: Mapping[str, Any] = errors[0] if errors else {}
    tag = raw.get("type") if isinstance(raw, dict) else None
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        return InvalidMessage(f"unknown message type {str(tag)[:40]!r}" if tag
                              else "message has no 'type' field",
                              {"expected_types": list(expected_types)})
    fields = [{"field": _field(e.get("loc", ()), tag), "problem": e.get("msg", "")}
              for e in errors[:10]]
    where = fields[0]["field"] if fields else "message"
    return InvalidMessage(f"invalid {where}: {fields[0]['problem'] if fields else 'bad value'}",
                          {"errors": fields})


def _field(loc: Sequence[Any], tag: Any) -> str:
    """A validation location as a dotted path, without a union's tag (the message's type)."""
    if loc and tag is not None and loc[0] == tag:
        loc = loc[1:]
    return ".".join(str(p) for p in loc) or "message"
