"""The edge table: every error class carries its HTTP status and its close code, the sockets
close with it, REST answers it, and every socket's wire messages are models the spec lists."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from websocket_service import errors
from websocket_service.errors import (
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    ERROR_CLASSES,
    ERROR_CODES,
    InvalidMessage,
    InvalidSession,
    RateLimitExceeded,
    ServiceError,
)
from websocket_service.protocol_rtc import (
    OfferAnswer,
    SigConnected,
    SigDisconnected,
    SigError,
    SignalMessage,
    SigPong,
)

from .live_server import MakeServer

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "websocket_service"
SPEC = (ROOT / "musetalk_websocket_spec.md").read_text()


def _subclasses(cls: type[ServiceError]) -> set[type[ServiceError]]:
    found = set()
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            found |= {sub} | _subclasses(sub)
    return found


def test_every_error_class_has_an_http_status_and_a_close_code() -> None:
    assert _subclasses(ServiceError) == set(ERROR_CLASSES)
    for cls in (ServiceError, *ERROR_CLASSES):
        assert 400 <= cls.http_status <= 599, cls
        expected = CLOSE_TRY_AGAIN if issubclass(cls, RateLimitExceeded) else CLOSE_POLICY
        assert cls.close_code == expected, cls


def test_the_spec_lists_the_edge_table_as_the_code_has_it() -> None:
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| (\d{3}) [^|]*\| [^|]*\|$", SPEC, re.M))
    closes = dict(re.findall(r"^\| `([A-Z_]+)` \| \d{3}[^|]*\| (\d{4}) \|$", SPEC, re.M))
    for cls in ERROR_CLASSES:
        if cls.__base__ is not ServiceError and cls.code == cls.__base__.code:
            continue  # a variant (RequestTimeout, NotYours): named in its parent's row
        assert int(rows[cls.code]) == cls.http_status, cls
        if cls.code != "PAYLOAD_TOO_LARGE":  # REST only
            assert int(closes[cls.code]) == cls.close_code, cls
    assert set(rows) == set(ERROR_CODES)


def _sources() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def test_close_codes_are_defined_once_and_chosen_by_the_error() -> None:
    defined = sorted({str(p.relative_to(PACKAGE)) for p, tree in _sources()
                      for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and node.value in (1008, 1013)})
    assert defined == ["errors.py"]
    # no transport decides by comparing an error's code string
    compared = [f"{p.relative_to(PACKAGE)}:{node.lineno}" for p, tree in _sources()
                for node in ast.walk(tree) if isinstance(node, ast.Compare)
                for c in (node.left, *node.comparators)
                if isinstance(c, ast.Constant) and c.value in ERROR_CODES]
    assert compared == []


def _keys(row: str) -> set[str]:
    return set(re.findall(r'[{,]\s*"(\w+)"', row))


@pytest.mark.parametrize("model", [
    OfferAnswer(sdp="v=0", session_id="s"), SigPong(t=1.0, server_time_ms=2),
    SigConnected(session_id="s"), SigDisconnected(session_id="s", reason="bye"),
    SigError(code="INVALID_MESSAGE", message="m")])
def test_signaling_messages_are_the_models_the_spec_lists(model: SignalMessage) -> None:
    sent = json.loads(model.to_json())
    row = re.search(r'^\| `(\{"type":"' + sent["type"] + r'"[^`]*)`', SPEC, re.M)
    assert row is not None, sent["type"]
    assert set(sent) == _keys(row[1])


# ------------------------------------------------------------------ through real sockets

def _init(user: str) -> str:
    return json.dumps({"type": "INIT", "session_id": None, "data": {"user_id": user}})


async def _closed_after_error(ws: Any) -> tuple[dict[str, Any], int | None]:
    """The ERROR (or error) the socket sent, and the code it then closed with."""
    error = None
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] in ("ERROR", "error"):
                error = msg.get("data", msg)
    assert error is not None
    return error, ws.close_code


async def test_the_sockets_close_with_the_errors_close_code(make_server: MakeServer) -> None:
    server = make_server(max_sessions=1)
    async with websockets.connect(server.ws + "/musetalk/v1/ws/first") as first:
        await first.send(_init("first"))
        assert json.loads(await first.recv())["type"] == "INIT_SUCCESS"
        async with websockets.connect(server.ws + "/musetalk/v1/ws/second") as second:
            await second.send(_init("second"))  # over MAX_SESSIONS: fatal, try again later
            err, code = await _closed_after_error(second)
        assert err["code"] == RateLimitExceeded.code and code == RateLimitExceeded.close_code
    async with websockets.connect(server.ws + "/musetalk/v1/mic/no-such-session") as mic:
        err, code = await _closed_after_error(mic)
    assert err["code"] == InvalidSession.code and code == InvalidSession.close_code
    async with websockets.connect(server.ws + "/musetalk/v1/rtc/bad%20id") as sig:
        err, code = await _closed_after_error(sig)
    assert err["code"] == InvalidMessage.code and code == InvalidMessage.close_code


async def test_invalid_input_is_explained_alike_and_rest_answers_400(make_server: MakeServer) -> None:
    server = make_server()
    async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
        r = await http.post("/offer", json={"sdp": "v=0", "type": "offer", "user_id": "bad id!"})
    assert r.status_code == InvalidMessage.http_status == 400
    body = r.json()
    assert body["code"] == "INVALID_MESSAGE" and body["message"].startswith("invalid body.user_id: ")
    assert body["details"]["errors"][0]["field"] == "body.user_id"

    async with websockets.connect(server.ws + "/musetalk/v1/rtc/u1") as sig:
        await sig.send(json.dumps({"type": "offer"}))  # no sdp
        err = json.loads(await sig.recv())
        assert err["type"] == "error" and err["details"]["errors"][0]["field"] == "sdp"
        await sig.send(json.dumps({"type": "dance"}))
        err = json.loads(await sig.recv())
        assert err["message"] == "unknown message type 'dance'"
        assert err["details"]["expected_types"] == ["offer", "ice-candidate", "ping", "bye"]
    async with websockets.connect(server.ws + "/musetalk/v1/ws/u1") as ws:
        await ws.send(json.dumps({"type": "INIT", "session_id": None, "data": {}}))
        err = json.loads(await ws.recv())["data"]
        assert err["code"] == "INVALID_MESSAGE" and err["details"]["errors"][0]["field"] == \
            "data.user_id"
        await ws.send(_init("u1"))
        sid = json.loads(await ws.recv())["session_id"]
        async with httpx.AsyncClient(base_url=server.http, timeout=20) as http:
            r = await http.post(f"/sessions/{sid}/audio", json={"end_of_speech": True})
        assert r.status_code == 400 and r.json()["details"]["errors"][0]["field"] == "data"
