"""Bad input of every kind gets an ERROR with the right code; the session keeps streaming."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import websockets

from .wsclient import Client, chunk_msg
from .wsclient import envelope_json as env

PCM_40MS = b"\x01\x00" * 640


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def bad_inputs(sid: str) -> list[tuple[str, str | bytes, str]]:
    """(case, message, expected code) — every class of bad input after INIT."""
    def gen(**chunk: object) -> str:
        return env("GENERATE", sid, audio_chunk=chunk)

    return [
        ("not json", "{not json", "INVALID_MESSAGE"),
        ("json but not an object", "[1, 2]", "INVALID_MESSAGE"),
        ("unknown type", env("DANCE", sid), "INVALID_MESSAGE"),
        ("no type", json.dumps({"session_id": sid, "data": {}}), "INVALID_MESSAGE"),
        ("flat (unwrapped) message", json.dumps({"type": "GENERATE", "session_id": sid,
                                                 "audio_chunk": {"data": b64(PCM_40MS)}}),
         "INVALID_MESSAGE"),
        ("data not an object", json.dumps({"type": "GENERATE", "session_id": sid, "data": [1]}),
         "INVALID_MESSAGE"),
        ("missing field", env("GENERATE", sid), "INVALID_MESSAGE"),
        ("wrong session_id", chunk_msg(str(uuid.uuid4()), PCM_40MS), "INVALID_SESSION"),
        ("bad session_id syntax", chunk_msg("no spaces allowed", PCM_40MS), "INVALID_MESSAGE"),
        ("bad base64", gen(data="@@not base64@@"), "INVALID_MESSAGE"),
        ("odd byte count", gen(data=b64(b"\x00" * 1279)), "INVALID_MESSAGE"),
        ("empty audio", gen(data=""), "INVALID_MESSAGE"),
        ("wrong sample rate", gen(data=b64(PCM_40MS), sample_rate=44100), "INVALID_MESSAGE"),
        ("wrong format", gen(data=b64(PCM_40MS), format="mp3"), "INVALID_MESSAGE"),
        ("stereo", gen(data=b64(PCM_40MS), channels=2), "INVALID_MESSAGE"),
        ("negative duration", gen(data=b64(PCM_40MS), duration_ms=-5), "INVALID_MESSAGE"),
        ("chunk over the maximum", gen(data=b64(b"\x00" * 96000)), "INVALID_MESSAGE"),
        ("oversized message", env("GENERATE", sid, pad="x" * 300_000), "INVALID_MESSAGE"),
        ("odd binary PCM", b"\x00" * 641, "INVALID_MESSAGE"),
        ("unknown base video in video_state",
         env("GENERATE", sid, audio_chunk={"data": b64(PCM_40MS)},
             video_state={"type": "speaking", "base_video": "speaking_9"}), "MODEL_NOT_FOUND"),
        ("unknown video_state type",
         env("GENERATE", sid, audio_chunk={"data": b64(PCM_40MS)}, video_state={"type": "x"}),
         "INVALID_MESSAGE"),
        ("unknown action index", env("ACTION", sid, action_index=9), "MODEL_NOT_FOUND"),
        ("action index zero", env("ACTION", sid, action_index=0), "INVALID_MESSAGE"),
        ("unknown action type", env("ACTION", sid, action_type="fly"), "MODEL_NOT_FOUND"),
        ("a base video as action", env("ACTION", sid, action_type="idle_0"), "MODEL_NOT_FOUND"),
        ("action with both forms", env("ACTION", sid, action_index=1, action_type="action_1"),
         "INVALID_MESSAGE"),
        ("action with neither form", env("ACTION", sid), "INVALID_MESSAGE"),
        ("unknown base video", env("STATE_CHANGE", sid, target_state="idle", base_video="nope"),
         "MODEL_NOT_FOUND"),
        ("an action as base video", env("STATE_CHANGE", sid, target_state="idle",
                                        base_video="action_1"), "MODEL_NOT_FOUND"),
        ("unknown state", env("STATE_CHANGE", sid, target_state="dancing"), "INVALID_MESSAGE"),
        ("illegal transition", env("STATE_CHANGE", sid, target_state="action"),
         "INVALID_STATE_TRANSITION"),
        ("second INIT", env("INIT", str(uuid.uuid4()), user_id="u1"), "INVALID_MESSAGE"),
    ]


CASES = [c[0] for c in bad_inputs("x")]


async def test_every_bad_input_gets_its_code_and_streaming_goes_on(server):
    client, _ = await Client.connect(server.ws)
    client.decode = False
    await client.recv_frames(5)
    for case, message, code in bad_inputs(client.session_id):
        before = len(client.frames)
        await client.send(message)
        err = await client.error()
        assert err["code"] == code, (case, err)
        assert err["message"] and "Traceback" not in json.dumps(err), case
        await client.recv_frames(3, timeout=5)  # (times out if the stream stopped)
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


@pytest.mark.parametrize("sid, data, code", [
    ("not a valid id!", {"user_id": "u1"}, "INVALID_MESSAGE"),
    (None, {}, "INVALID_MESSAGE"),  # no user_id
    (None, {"user_id": "someone-else"}, "INVALID_MESSAGE"),
    (None, {"user_id": "u1", "video_config": {"avatar_id": "ghost"}}, "MODEL_NOT_FOUND"),
    (None, {"user_id": "u1", "video_config": {"resolution": "333x333"}}, "INVALID_MESSAGE"),
    (None, {"user_id": "u1", "video_config": {"resolution": "big"}}, "INVALID_MESSAGE"),
    (None, {"user_id": "u1", "video_config": {"fps": 30}}, "INVALID_MESSAGE"),
    (None, {"user_id": "u1", "video_config": {"base_video": "nope"}}, "MODEL_NOT_FOUND"),
    (None, {"user_id": "u1", "video_config": {"gop_seconds": 2.0}}, "INVALID_MESSAGE"),
])
async def test_bad_init(server, sid, data, code):
    client, _ = await Client.connect(server.ws, init=False)
    await client.send({"type": "INIT", "session_id": sid, "data": data})
    err = await client.error()
    assert err["code"] == code, err
    assert server.get("/sessions").json()["count"] == 0
    await client.close()


@pytest.mark.parametrize("user_id", ["bad%20id", "x" * 65, "semi;colon"])
async def test_invalid_user_id_is_refused_with_a_reason(server, user_id):
    async with websockets.connect(f"{server.ws}/musetalk/v1/ws/{user_id}") as ws:
        err = json.loads(await ws.recv())
        assert err["type"] == "ERROR" and err["session_id"] is None
        assert err["data"]["code"] == "INVALID_MESSAGE" and "user_id" in err["data"]["message"]
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
    await b.send({"type": "INIT", "session_id": a.session_id, "data": {"user_id": "b"}})
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
    await client.sync()  # every chunk sent has been handled
    assert server.get("/sessions").json()["sessions"][0]["audio_chunks_rejected"] >= 1
    await client.close()


async def test_flat_init_is_told_how_to_wrap(server):
    """The old flat form gets INVALID_MESSAGE whose message says how to wrap it."""
    client, _ = await Client.connect(server.ws, init=False)
    await client.send({"type": "INIT", "session_id": client.session_id, "user_id": "u1"})
    err = await client.error()
    assert err["code"] == "INVALID_MESSAGE" and '"data"' in err["message"]
    assert err["details"]["move_into_data"] == ["user_id"]
    await client.close()


async def test_mislabelled_chunks_are_accepted_and_counted(server):
    """The spec's own example: 640 bytes (20 ms) labelled duration_ms 40. The bytes win."""
    client, _ = await Client.connect(server.ws)
    for _ in range(10):  # 10 x 320 samples = 200 ms = 5 frames
        await client.msg("GENERATE", audio_chunk={"data": b64(b"\x01\x00" * 320),
                                                  "format": "pcm_s16le", "sample_rate": 16000,
                                                  "channels": 1, "duration_ms": 40})
    await client.msg("END_OF_SPEECH")
    ended = await client.recv_until(lambda m: m["type"] in ("SPEECH_ENDED", "ERROR"))
    assert ended["type"] == "SPEECH_ENDED" and ended["frames"] == 5
    info = server.get(f"/sessions/{client.session_id}").json()
    assert info["duration_mismatches"] == 10 and info["audio_seconds_received"] == 0.2
    await client.close()
