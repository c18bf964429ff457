"""Property-based fuzzing of the envelope protocol through a real socket to one session.

Hypothesis generates envelopes of every client message type (CLOSE aside: it ends the
session), with each field valid, out of range, of the wrong type or missing, plus messages
that are not envelopes at all. Each one is followed by a PING marker; the properties:

* the server answers every fuzzed message with nothing, its normal reply or an ERROR
  whose data is exactly ``{code, message, details}`` with a known code, never
  ``INTERNAL_ERROR`` (an unexpected exception) and never a traceback or a source path;
* the session keeps streaming afterwards.

Bounded: ``max_examples`` 200 and no per-example deadline, ~20 s on a loaded 2-core box.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from websocket_service.errors import ERROR_CODES
from websocket_service.protocol import CLIENT_TYPES

from .wsclient import FRAME_TYPES, Client, flatten

LEAKS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/work/|websocket_service|0x[0-9a-f]{6}")
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                 st.floats(allow_nan=False), st.text(max_size=20), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
PCM = base64.b64encode(b"\x01\x00" * 640).decode()


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's good value most of the time, else junk; ``...`` drops the field."""
    return st.one_of(value, value, JUNK, st.just(...))


def _data(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({k: _maybe(v) for k, v in fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not ...})


AUDIO = _data({"data": st.sampled_from([PCM, "", "!!notbase64", PCM[:-4], "AAA="]),
               "format": st.sampled_from(["pcm_s16le", "pcm_f32le"]),
               "sample_rate": st.sampled_from([16000, 8000, 48000]),
               "channels": st.sampled_from([1, 2]),
               "duration_ms": st.floats(-10, 5000, allow_nan=False)})
STATES = st.sampled_from(["idle", "speaking", "listening", "action", "processing", "bogus"])
VIDEOS = st.sampled_from(["idle_0", "idle_1", "speaking_0", "action_1", "nod", "../etc", "x" * 80])
DATA: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "INIT": _data({"user_id": st.sampled_from(["u1", "u2", "", "a b"]),
                   "auth_token": st.text(max_size=10),
                   "video_config": _data({"resolution": st.sampled_from(["512x512", "63x64",
                                                                          "1x1", "abc"]),
                                          "fps": st.integers(-1, 100),
                                          "avatar_id": st.sampled_from(["default", "nope", "../x"]),
                                          "bitrate": st.integers(0, 10**9),
                                          "gop_seconds": st.floats(-1, 5, allow_nan=False)})}),
    "GENERATE": _data({"audio_chunk": AUDIO, "end_of_speech": st.booleans(),
                       "video_state": _data({"type": STATES, "base_video": VIDEOS})}),
    "STATE_CHANGE": _data({"target_state": STATES, "base_video": VIDEOS}),
    "ACTION": _data({"action_index": st.integers(-5, 1200), "action_type": VIDEOS,
                     "audio_chunk": AUDIO}),
    "INTERRUPT": _data({}), "END_OF_SPEECH": _data({}), "REQUEST_KEYFRAME": _data({}),
    "PING": _data({"t": st.floats(allow_nan=False)}),
}
assert set(DATA) == set(CLIENT_TYPES) - {"CLOSE"}


@st.composite
def envelopes(draw: st.DrawFn, session_id: str) -> str | bytes:
    kind = draw(st.sampled_from(["envelope"] * 8 + ["extra_key", "flat", "not_json", "junk",
                                                    "binary"]))
    if kind == "binary":  # raw PCM (our addition): any length, odd ones are refused
        return draw(st.binary(max_size=64))
    if kind == "not_json":
        return draw(st.text(max_size=40))
    if kind == "junk":
        return json.dumps(draw(JUNK))
    type_ = draw(st.one_of(st.sampled_from(sorted(DATA)), st.sampled_from(sorted(DATA)),
                           st.text(max_size=12), JUNK))
    data = draw(DATA[type_]) if isinstance(type_, str) and type_ in DATA else draw(JUNK)
    sid = draw(st.sampled_from([session_id, session_id, None, "other-session", 7]))
    msg: dict[str, Any] = {"type": type_, "session_id": sid, "data": data}
    if kind == "flat" and isinstance(data, dict):
        msg = {"type": type_, "session_id": sid, **data}
    elif kind == "extra_key":
        msg["extra"] = draw(JUNK)
    return json.dumps(msg)


def _check_error(m: dict[str, Any]) -> None:
    assert set(m) == {"type", "session_id", "data"}, m
    data = m["data"]
    assert set(data) == {"code", "message", "details"}, data
    assert data["code"] in ERROR_CODES and data["code"] != "INTERNAL_ERROR", data
    assert isinstance(data["message"], str) and data["message"], data
    assert isinstance(data["details"], dict), data
    assert not LEAKS.search(json.dumps(data)), data


async def _exchange(client: Client, text: str | bytes, marker: float) -> None:
    """Send ``text`` and a PING marker; check everything that comes back before its PONG."""
    await client.send(text)
    await client.msg("PING", t=marker)
    async with asyncio.timeout(10):
        while True:
            raw = json.loads(await client.ws.recv())
            if raw.get("type") in FRAME_TYPES:
                client._take(raw)
                continue
            if raw.get("type") == "ERROR":
                _check_error(raw)
            elif raw.get("type") == "PONG" and raw["data"].get("t") == marker:
                return
            else:
                flatten(raw)  # a normal reply (STATE_CHANGED, ACTION_TRIGGERED, ...): an envelope


def test_fuzzed_envelopes_get_no_reply_or_a_clean_error_and_the_stream_goes_on(server) -> None:
    loop = asyncio.new_event_loop()
    try:
        client, reply = loop.run_until_complete(Client.connect(server.ws))
        assert reply is not None and reply["type"] == "INIT_SUCCESS"
        client.decode = False
        markers = itertools.count(10**9)

        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(text=envelopes(client.session_id))
        def one(text: str | bytes) -> None:
            loop.run_until_complete(_exchange(client, text, float(next(markers))))

        one()
        assert next(markers) - 10**9 >= 150  # hypothesis did run (about) max_examples
        frames = len(client.frames)
        loop.run_until_complete(client.recv_frames(10))  # still streaming
        assert len(client.frames) >= frames + 10
        session = server.services.sessions.get(client.session_id)
        assert session.stats.errors_sent > 0  # the fuzzer did reach the error paths
        loop.run_until_complete(client.close())
    finally:
        loop.close()
