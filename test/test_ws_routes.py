"""The WebSocket dispatch table: every client message has one route, and who may send it holds."""

from __future__ import annotations

import typing

import numpy as np

from websocket_service.protocol import ClientMessage
from websocket_service.transports.websocket import Access, Connection
from websocket_service.transports.ws_intake import AudioBytes

from .wsclient import Client


def test_every_client_message_has_a_route():
    union = typing.get_args(typing.get_args(ClientMessage)[0])
    assert set(Connection.ROUTES) == {*union, AudioBytes}
    owner_only = {t.__name__ for t, r in Connection.ROUTES.items() if r.access is Access.OWNER}
    assert owner_only == {"AudioBytes", "GenerateMsg", "StateChangeMsg", "ActionMsg",
                          "InterruptMsg", "EndOfSpeechMsg"}


async def test_a_viewers_binary_audio_is_refused_and_never_reaches_the_session(server):
    owner, _ = await Client.connect(server.ws, "owner")
    await owner.recv_frames(2)
    v, reply = await Client.watch(server.ws, "v1", owner.session_id)
    assert reply["type"] == "INIT_SUCCESS"
    await v.send(np.zeros(640, np.int16).tobytes())
    err = await v.error()
    assert err["code"] == "INVALID_SESSION" and "receive-only" in err["message"]
    info = server.get(f"/sessions/{owner.session_id}").json()
    assert info["audio_seconds_received"] == 0
    await v.close()
    await owner.close()
