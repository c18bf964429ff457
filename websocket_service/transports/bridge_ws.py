"""``/musetalk/v1/bridge/{session_id}``: an external renderer pushes frames and audio.

Envelopes like the protocol's (``?token=`` when ``AUTH_TOKEN`` or JWT keys are set). First
``BRIDGE_CONFIG {format: rgb24|rgba|i420|jpeg, width?, height?}`` (the size, if given, must be
the session's) -> ``BRIDGE_READY {width, height, format}``. Then, any mix of

* ``BRIDGE_FRAME {timestamp_ms, data: base64, format?}`` and ``BRIDGE_AUDIO {timestamp_ms,
  data: base64 of 16 kHz mono PCM s16le}``, or
* binary messages: one byte kind (1 frame, 2 audio), the timestamp as a little-endian float64
  (ms), then the raw payload.

Errors are ``ERROR {code, message, details}``; the bridge stays. When the socket closes the
session goes back to its own frames. See :mod:`..bridge` for timing and bounds.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from typing import Any

from fastapi import WebSocket
from pydantic import ValidationError

from ..bridge import FORMATS, Bridge
from ..errors import InvalidMessage, ServiceError
from ..protocol import (
    BRIDGE_TYPES,
    BridgeConfigData,
    BridgeMediaData,
    BridgeReadyData,
    ServerMessage,
    pcm_from_bytes,
)
from ..session import Session
from ..wire import error_message, explain_invalid, parse_json
from .session_socket import open_session_socket

HEADER = struct.Struct("<Bd")  # kind, timestamp_ms


async def bridge_endpoint(ws: WebSocket, session_id: str) -> None:
    session = await open_session_socket(ws, session_id)
    if session is None:
        return
    bridge: Bridge | None = None
    try:
        while (msg := await ws.receive())["type"] != "websocket.disconnect":
            try:
                bridge = await _handle(ws, session, bridge, msg)
            except ServiceError as err:
                await ws.send_text(error_message(err, session_id).to_json())
    finally:
        if bridge is not None:
            session.close_bridge(bridge)


async def _handle(ws: WebSocket, session: Session, bridge: Bridge | None,
                  msg: Mapping[str, Any]) -> Bridge | None:
    now = session.clock.now()
    if msg.get("bytes") is not None:
        raw = msg["bytes"]
        if bridge is None:
            raise InvalidMessage("send BRIDGE_CONFIG first")
        if len(raw) < HEADER.size:
            raise InvalidMessage(f"a binary message starts with {HEADER.size} header bytes")
        kind, ts = HEADER.unpack_from(raw)
        _push(session, bridge, kind, ts, raw[HEADER.size:], now)
        return bridge
    env = parse_json(msg.get("text") or "")  # InvalidMessage when not JSON, or nested too deep
    try:
        type_, data = env["type"], env.get("data") or {}
    except (AttributeError, TypeError, KeyError):
        raise InvalidMessage("a text message is an envelope {type, session_id, data}") from None
    try:
        if type_ == "BRIDGE_CONFIG":
            return await _configure(ws, session, bridge, BridgeConfigData.model_validate(data))
        if type_ in ("BRIDGE_FRAME", "BRIDGE_AUDIO"):
            if bridge is None:
                raise InvalidMessage("send BRIDGE_CONFIG first")
            media = BridgeMediaData.model_validate(data)
            _push(session, bridge, 1 if type_ == "BRIDGE_FRAME" else 2, media.timestamp_ms,
                  _b64(media.data), now, media.format)
            return bridge
    except ValidationError as exc:
        raise explain_invalid(data, exc, expected_types=BRIDGE_TYPES) from None
    raise InvalidMessage(f"unknown message type {str(type_)[:40]!r}",
                         {"expected_types": BRIDGE_TYPES})


async def _configure(ws: WebSocket, session: Session, bridge: Bridge | None,
                     cfg: BridgeConfigData) -> Bridge:
    v = session.video
    if (cfg.width or v.width, cfg.height or v.height) != (v.width, v.height):
        raise InvalidMessage(f"the session streams {v.width}x{v.height}; push frames of that size",
                             {"width": v.width, "height": v.height})
    if cfg.format not in FORMATS:
        raise InvalidMessage(f"unknown frame format {cfg.format!r}", {"formats": list(FORMATS)})
    if bridge is not None:
        session.close_bridge(bridge)
    bridge = session.open_bridge(cfg.format)
    ready = BridgeReadyData(width=v.width, height=v.height, format=cfg.format)
    await ws.send_text(ServerMessage(type="BRIDGE_READY", session_id=session.session_id,
                                     data=ready).to_json())
    return bridge


def _push(session: Session, bridge: Bridge, kind: int, ts: float, payload: bytes,
          now: float, fmt: str | None = None) -> None:
    if kind == 1:
        bridge.push_frame(payload, ts, now, fmt)
    elif kind == 2:
        try:
            pcm = pcm_from_bytes(payload, session.settings.max_chunk_ms)
        except ValueError as exc:
            raise InvalidMessage(str(exc)) from None
        bridge.push_audio(pcm, ts, now)
    else:
        raise InvalidMessage(f"unknown binary kind {kind}: 1 is a frame, 2 audio")


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMessage("data is not valid base64") from None
