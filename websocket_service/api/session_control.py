"""REST control of a running session, for clients whose media goes over WebRTC.

``POST /sessions/{id}/audio`` takes speech (e.g. TTS output) as raw PCM s16le 16 kHz mono
(``application/octet-stream``) or JSON ``{data: base64, end_of_speech}``; actions, interrupt
and end-of-speech have their own routes. They work for WebSocket sessions too. All but the
demo page's speech samples need the bearer token when ``AUTH_TOKEN`` is set.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, ValidationError

from ..errors import InvalidMessage, ModelNotFound
from ..manager import Services
from ..protocol import pcm_from_bytes
from ..session import Session
from ..units import SAMPLE_RATE
from ..wire import explain_invalid
from .access import owned_session
from .auth import UNAUTHORIZED, Caller, require_token

router = APIRouter(tags=["session control"], dependencies=[Depends(require_token)],
                   responses=UNAUTHORIZED)
public = APIRouter()  # the demo page's samples, open even when AUTH_TOKEN is set
SAMPLES = {"speech.wav": "speech_pauses_16k.wav", "short.wav": "short_16k.wav"}
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


class AudioBody(BaseModel):
    data: str = Field(..., description="base64 of PCM s16le, 16 kHz, mono")
    end_of_speech: bool = False


def _session(request: Request, session_id: str, caller: Caller) -> Session:
    services: Services = request.app.state.services
    return owned_session(services.sessions, caller, session_id)


def _ack(session: Session, **extra: Any) -> dict[str, Any]:
    return {"session_id": session.session_id, "state": session.machine.state.value,
            "buffered_audio_ms": round(session.stream.buffered_samples() * 1000 / SAMPLE_RATE), **extra}


def _pcm(raw: bytes, max_ms: int) -> np.ndarray:
    try:
        return pcm_from_bytes(raw, max_ms)  # the same checks as the WebSocket protocol
    except ValueError as exc:
        raise InvalidMessage(str(exc), {"max_ms": max_ms}) from None


@router.post("/sessions/{session_id}/audio", status_code=202)
async def push_audio(request: Request, session_id: str, caller: Caller,
                     end_of_speech: bool = Query(False)) -> dict[str, Any]:
    """Queue speech for the avatar to say; it is played on the session's own timeline."""
    session = _session(request, session_id, caller)
    max_ms = int(session.settings.max_buffered_audio_s * 1000)
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            msg = AudioBody.model_validate_json(body)
        except ValidationError as exc:
            raise explain_invalid(body, exc, expected_types=(), envelope=False) from None
        try:
            raw = base64.b64decode(msg.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessage("data is not valid base64 (of PCM s16le)") from None
        end_of_speech = msg.end_of_speech
    else:
        raw = body
    pcm = _pcm(raw, max_ms)
    session.push_audio(pcm, end_of_speech=end_of_speech)
    return _ack(session, samples=len(pcm))


@router.post("/sessions/{session_id}/action/{name}", status_code=202)
async def action(request: Request, session_id: str, name: str, caller: Caller) -> dict[str, Any]:
    session = _session(request, session_id, caller)
    session.start_action(name)
    return _ack(session, action=name)


@router.post("/sessions/{session_id}/interrupt")
async def interrupt(request: Request, session_id: str, caller: Caller) -> dict[str, Any]:
    session = _session(request, session_id, caller)
    session.interrupt()
    return _ack(session)


@router.post("/sessions/{session_id}/end_of_speech")
async def end_of_speech(request: Request, session_id: str, caller: Caller) -> dict[str, Any]:
    session = _session(request, session_id, caller)
    session.end_of_speech()
    return _ack(session)


class ViewToken(BaseModel):
    session_id: str
    view_token: str = Field(description="lets its holder watch this session, receive-only: "
                                        "INIT.data.auth_token with viewer, or auth_token of "
                                        "POST /offer and of the signaling offer")


@router.post("/sessions/{session_id}/view_token", response_model=ViewToken)
async def grant_view(request: Request, session_id: str, caller: Caller) -> ViewToken:
    """Share the session with viewers: its owner gets the token that lets anyone who holds it
    watch (the same token until revoked; it ends with the session)."""
    session = _session(request, session_id, caller)
    token = request.app.state.services.sessions.grant_view(session.session_id)
    return ViewToken(session_id=session.session_id, view_token=token)


@router.delete("/sessions/{session_id}/view_token")
async def revoke_view(request: Request, session_id: str, caller: Caller) -> dict[str, Any]:
    """Stop sharing: new viewers need a new grant; those watching stay."""
    session = _session(request, session_id, caller)
    revoked = request.app.state.services.sessions.revoke_view(session.session_id)
    return {"session_id": session.session_id, "revoked": revoked}


@public.get("/samples/{name}", include_in_schema=False)
async def sample(name: str) -> FileResponse:
    """Built-in speech samples for the demo page (16 kHz mono WAV)."""
    path = FIXTURES / SAMPLES.get(name, "-")
    if name not in SAMPLES or not path.is_file():
        raise ModelNotFound(f"no sample {name!r}", {"available": sorted(SAMPLES)})
    return FileResponse(path, media_type="audio/wav")
