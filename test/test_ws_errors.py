"""Bad input of every kind gets an ERROR with the right code; the session keeps streaming."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import websockets

from .wsclient import Client, chunk_msg

PCM_40MS = b"\x01\x00" * 640


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def bad_inputs(sid: str) -> list[tuple[str, str | bytes, str]]:
    """(case, message, expected code) — every class of bad input after INIT."""
    gen = {"type": "GENERATE", "session_id": sid}
    return [
        ("not json", "{not json", "INVALID_MESSAGE"),
        ("json but not an object", "[1, 2]", "INVALID_MESSAGE"),
        ("unknown type", json.dumps({"type": "DANCE", "session_id": sid}), "INVALID_MESSAGE"),
        ("no type", json.dumps({"session_id": sid}), "INVALID_MESSAGE"),
        ("missing field", json.dumps(gen), "INVALID_MESSAGE"),
        ("wrong session_id", chunk_msg(str(uuid.uuid4()), PCM_40MS), "INVALID_SESSION"),
        ("bad base64", json.dumps({**gen, "audio_chunk": {"data": "@@not base64@@"}}), "INVALID_MESSAGE"),
        ("odd byte count", json.dumps({**gen, "audio_chunk": {"data": b64(b"\x00" * 1279)}}),
         "INVALID_MESSAGE"),
        ("empty audio", json.dumps({**gen, "audio_chunk": {"data": ""}}), "INVALID_MESSAGE"),
        ("wrong sample rate", json.dumps({**gen, "audio_chunk": {"data": b64(PCM_40MS),
                                                                 "sample_rate": 44100}}),
         "INVALID_MESSAGE"),
        ("wrong format", json.dumps({**gen, "audio_chunk": {"data": b64(PCM_40MS), "format": "mp3"}}),
         "INVALID_MESSAGE"),
        ("stereo", json.dumps({**gen, "audio_chunk": {"data": b64(PCM_40MS), "channels": 2}}),
         "INVALID_MESSAGE"),
        ("duration mismatch", json.dumps({**gen, "audio_chunk": {"data": b64(PCM_40MS),
                                                                 "duration_ms": 400}}),
         "INVALID_MESSAGE"),
        ("chunk over the maximum", json.dumps({**gen, "audio_chunk": {"data": b64(b"\x00" * 96000)}}),
         "INVALID_MESSAGE"),
        ("oversized message", json.dumps({**gen, "pad": "x" * 300_000}), "INVALID_MESSAGE"),
        ("odd binary PCM", b"\x00" * 641, "INVALID_MESSAGE"),
        ("unknown action", json.dumps({"type": "ACTION", "session_id": sid, "action_name": "fly"}),
         "MODEL_NOT_FOUND"),
        ("unknown base video", json.dumps({"type": "STATE_CHANGE", "session_id": sid,
                                           "target_state": "idle", "base_video": "nope"}),
         "MODEL_NOT_FOUND"),
        ("unknown state", json.dumps({"type": "STATE_CHANGE", "session_id": sid,
                                      "target_state": "dancing"}), "INVALID_MESSAGE"),
        ("illegal transition", json.dumps({"type": "STATE_CHANGE", "session_id": sid,
                                           "target_state": "action"}), "INVALID_STATE_TRANSITION"),
        ("second INIT", json.dumps({"type": "INIT", "session_id": str(uuid.uuid4()), "user_id": "u1"}),
         "INVALID_MESSAGE"),
    ]


CASES = [c[0] for c in bad_inputs("x")]


async def test_every_bad_input_gets_its_code_and_streaming_goes_on(server):
    client, _ = await Client.connect(server.ws)
    client.decode = False
    await client.recv_for(0.2)
    for case, message, code in bad_inputs(client.session_id):
        before = len(client.frames)
        await client.send(message)
        err = await client.error()
        assert err["code"] == code, (case, err)
        assert err["message"] and "Traceback" not in json.dumps(err), case
        await client.recv_for(0.12)
        assert len(client.frames) > before, f"stream stopped after: {case}"
    # the session is healthy: speech still works after all that
    await client.send(chunk_msg(client.session_id, PCM_40MS * 5))
    await client.msg("END_OF_SPEECH")
    ended = await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
    assert ended["frames"] == 5
    assert server.get("/sessions").json()["sessions"][0]["errors_sent"] == len(CASES)
    await client.close()


async def test_messages_before_init_are_refused(server):
    client, _ = await Client.connect(server.ws, init=False)
    await client.send(chunk_msg(str(uuid.uuid4()), PCM_40MS))
    assert (await client.error())["code"] == "INVALID_SESSION"
    await client.send(PCM_40MS)
    assert (await client.error())["code"] == "INVALID_SESSION"
    # and INIT still works afterwards
    await client.msg("INIT", user_id="u1")
    ok = await client.recv_until(lambda m: m["type"] in ("INIT_SUCCESS", "ERROR"))
    assert ok["type"] == "INIT_SUCCESS"
    await client.close()


@pytest.mark.parametrize("init, code", [
    ({"session_id": "not-a-uuid", "user_id": "u1"}, "INVALID_MESSAGE"),
    ({"session_id": "6f1c1d34-6d5e-11ee-b962-0242ac120002", "user_id": "u1"}, "INVALID_MESSAGE"),  # v1
    ({"session_id": str(uuid.uuid4()), "user_id": "someone-else"}, "INVALID_MESSAGE"),
    ({"session_id": str(uuid.uuid4()), "user_id": "u1", "video_config": {"avatar_id": "ghost"}},
     "MODEL_NOT_FOUND"),
    ({"session_id": str(uuid.uuid4()), "user_id": "u1", "video_config": {"width": 333}},
     "INVALID_MESSAGE"),
    ({"session_id": str(uuid.uuid4()), "user_id": "u1", "video_config": {"base_video": "nope"}},
     "MODEL_NOT_FOUND"),
])
async def test_bad_init(server, init, code):
    client, _ = await Client.connect(server.ws, init=False)
    await client.send({"type": "INIT", **init})
    err = await client.error()
    assert err["code"] == code, err
    assert server.get("/sessions").json()["count"] == 0
    await client.close()


@pytest.mark.parametrize("user_id", ["bad%20id", "x" * 65, "semi;colon"])
async def test_invalid_user_id_is_refused_with_a_reason(server, user_id):
    async with websockets.connect(f"{server.ws}/musetalk/v1/ws/{user_id}") as ws:
        err = json.loads(await ws.recv())
        assert err["type"] == "ERROR" and err["code"] == "INVALID_MESSAGE"
        assert "user_id" in err["message"]
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


async def test_session_limit(make_server):
    server = make_server(max_sessions=2)
    a, ra = await Client.connect(server.ws, "a")
    b, rb = await Client.connect(server.ws, "b")
    assert ra["type"] == rb["type"] == "INIT_SUCCESS"
    c, rc = await Client.connect(server.ws, "c")
    assert rc["type"] == "ERROR" and rc["code"] == "RATE_LIMIT_EXCEEDED"
    assert rc["details"]["max_sessions"] == 2
    await c.ws.wait_closed()
    assert c.ws.close_code == 1013
    await a.close()
    await b.close()


async def test_duplicate_session_id_is_refused(server):
    a, _ = await Client.connect(server.ws, "a")
    b, _ = await Client.connect(server.ws, "b", init=False)
    await b.send({"type": "INIT", "session_id": a.session_id, "user_id": "b"})
    assert (await b.error())["code"] == "INVALID_SESSION"
    await a.close()
    await b.close()


async def test_init_timeout(make_server):
    server = make_server(init_timeout_s=0.5)
    client, _ = await Client.connect(server.ws, init=False)
    err = await client.error(timeout=3)
    assert err["code"] == "INVALID_SESSION" and "INIT" in err["message"]
    await client.ws.wait_closed()
    assert client.ws.close_code == 1008


async def test_auth_token(make_server):
    server = make_server(auth_token="s3cret")
    bad, reply = await Client.connect(server.ws, auth_token="wrong")
    assert reply["code"] == "AUTH_FAILED"
    await bad.ws.wait_closed()
    good, reply = await Client.connect(server.ws, auth_token="s3cret")
    assert reply["type"] == "INIT_SUCCESS"
    await good.close()


async def test_too_much_buffered_audio_is_rate_limited(make_server):
    # 1 s of audio may wait, plus 5 rendered frames; 3.2 s sent at once must trip the limit
    # however fast the engine renders meanwhile
    server = make_server(max_buffered_audio_s=1.0, speech_queue_frames=5)
    client, _ = await Client.connect(server.ws)
    client.decode = False
    for _ in range(16):
        await client.send(chunk_msg(client.session_id, b"\x00\x01" * 3200))
    err = await client.error()
    assert err["code"] == "RATE_LIMIT_EXCEEDED"
    await client.recv_for(0.2)
    assert server.get("/sessions").json()["sessions"][0]["audio_chunks_rejected"] >= 1
    await client.close()
