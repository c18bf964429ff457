"""LOG_FORMAT=json: one JSON object per line, the session id on every line logged for it."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from websocket_service.logs import make_handler

from .wsclient import Client


async def test_json_lines_carry_the_session_id_of_the_session_they_were_logged_for(server):
    out = io.StringIO()
    handler = make_handler("json", out)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        client, reply = await Client.connect(server.ws)
        assert reply is not None
        client.decode = False
        await client.msg("CLOSE")
        await client.recv_until(lambda m: m["type"] == "CLOSE_ACK")
        await client.close()
        closed = f"session {client.session_id} closed"
        async with asyncio.timeout(10):
            while closed not in out.getvalue():  # the server tears it down on its own loop
                await asyncio.sleep(0.02)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    mine = [r for r in lines if client.session_id in r["message"]]
    assert {r["message"].split(":")[0] for r in mine} >= {
        f"session {client.session_id} opened", f"session {client.session_id} closed"}, lines
    assert all(r["session_id"] == client.session_id for r in mine), mine
    assert all(set(r) >= {"ts", "level", "logger", "message", "session_id"} for r in lines)
