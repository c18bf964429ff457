"""Unit tests of the pieces the session is built from."""

from __future__ import annotations

import time

import av
import numpy as np
import pytest
from pydantic import ValidationError

from websocket_service.avatars.model import Avatar, Clip, ClipKind
from websocket_service.avatars.store import AvatarStore
from websocket_service.config import Settings
from websocket_service.cursor import Cursor, pingpong
from websocket_service.engines.audio_buffer import UtteranceBuffer
from websocket_service.errors import InvalidMessage, InvalidStateTransition, ModelNotFound
from websocket_service.media.encoder import H264Encoder
from websocket_service.protocol import CLIENT_ADAPTER, GenerateMsg, InitMsg
from websocket_service.states import ALLOWED, CLIENT_ALLOWED, AvatarState, StateMachine
from websocket_service.wire import explain_invalid


# ---------------------------------------------------------------- state machine
def test_state_table_moves_and_events():
    m = StateMachine()
    assert m.move(AvatarState.IDLE) is None  # same state: no-op
    seen = [m.move(AvatarState.SPEAKING), m.move(AvatarState.ACTION), m.move(AvatarState.IDLE)]
    assert [(c.previous.value, c.current.value) for c in seen if c] == [
        ("idle", "speaking"), ("speaking", "action"), ("action", "idle")]


def test_client_table_refuses_illegal_moves_with_details():
    m = StateMachine(AvatarState.ACTION)
    with pytest.raises(InvalidStateTransition) as exc:
        m.check(AvatarState.IDLE, CLIENT_ALLOWED)
    assert exc.value.details == {"from": "action", "to": "idle", "allowed": []}
    assert all(s not in ALLOWED[s] for s in AvatarState)


# ---------------------------------------------------------------- cursor
def _avatar(n_base: int = 4, n_action: int = 6) -> Avatar:
    base = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(n_base)])
    act = np.stack([np.full((8, 8, 3), 200, np.uint8)] * n_action)
    return Avatar("t", 8, 8, {"idle": Clip("idle", ClipKind.BASE, base),
                              "wave": Clip("wave", ClipKind.ACTION, act)})


def test_pingpong_has_no_seam():
    assert [pingpong(p, 4) for p in range(8)] == [0, 1, 2, 3, 2, 1, 0, 1]
    assert pingpong(5, 1) == 0


def test_cursor_splices_action_with_crossfade_and_keeps_the_loop_running():
    c = Cursor(_avatar(), "idle", crossfade=2)
    c.next()
    c.start_action("wave")
    frames = [c.next() for _ in range(6)]
    assert [f.action for f in frames] == ["wave"] * 6
    assert [round(f.progress, 3) for f in frames] == [round((i + 1) / 6, 3) for i in range(6)]
    levels = [int(f.image[0, 0, 0]) for f in frames]
    assert levels[0] < levels[1] < 200 and levels[2] == levels[3] == 200 and levels[5] < levels[4] < 200
    after = c.next()
    assert after.action is None and after.clip == "idle" and after.index == pingpong(7, 4)
    with pytest.raises(ModelNotFound):
        c.start_action("fly")
    c.start_action("wave")
    with pytest.raises(InvalidStateTransition):
        c.start_action("wave")


# ---------------------------------------------------------------- utterance buffer
def test_utterance_buffer_lookahead_end_and_bounded_history():
    b = UtteranceBuffer(lookahead_frames=1, clock=time.monotonic, history_samples=1280)
    b.push(np.ones(640 * 3, np.int16))
    assert b.ready() == 2  # frame 2 waits for its look-ahead
    slots = b.take(10)
    assert [(s.index, s.last) for s in slots] == [(0, False), (1, False)]
    b.push(np.ones(100, np.int16))
    b.end()
    slots = b.take(10)
    assert [(s.index, s.last) for s in slots] == [(2, False), (3, True)]
    assert slots[-1].pcm[:100].tolist() == [1] * 100 and slots[-1].pcm[100:].max() == 0
    # a new utterance starts after end()
    for _ in range(100):
        b.push(np.ones(640, np.int16))
    b.take(90)
    assert len(b._utts[-1].samples) <= 640 * 11 + 1280  # history trimmed
    b.clear()
    assert b.ready() == 0 and b.buffered_samples() == 0


# ---------------------------------------------------------------- H.264
def test_encoder_annexb_keyframes_carry_sps_pps_and_decode_alone():
    enc = H264Encoder(128, 96, gop_frames=5)
    assert enc._ctx.is_open  # opened with the stream, not on its first (speech) frame
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (96, 128, 3), np.uint8)
    out = [enc.encode(np.roll(img, i, axis=1)) for i in range(12)]
    assert [o.keyframe for o in out] == [i % 5 == 0 for i in range(12)]
    for o in out:
        assert o.data.startswith(b"\x00\x00\x00\x01") or o.data.startswith(b"\x00\x00\x01")
        nal_types = {b & 0x1F for b in _nal_headers(o.data)}
        if o.keyframe:
            assert {7, 8, 5} <= nal_types  # SPS, PPS, IDR
        else:
            assert 5 not in nal_types and 7 not in nal_types
    dec = av.CodecContext.create("h264", "r")  # joining mid-stream at a keyframe works
    pics = [dec.decode(av.Packet(o.data)) for o in out[5:]]
    assert all(len(p) == 1 for p in pics)
    enc.request_keyframe()
    assert enc.encode(img).keyframe
    with pytest.raises(ValueError):
        H264Encoder(127, 96)


def _nal_headers(data: bytes) -> list[int]:
    heads, i = [], 0
    while (i := data.find(b"\x00\x00\x01", i)) != -1:
        heads.append(data[i + 3])
        i += 3
    return heads


# ---------------------------------------------------------------- protocol
def test_protocol_parses_by_type_and_checks_fields():
    import uuid

    sid = str(uuid.uuid4())
    m = CLIENT_ADAPTER.validate_python({"type": "INIT", "session_id": sid,
                                        "data": {"user_id": "a",
                                                 "video_config": {"resolution": "640x360"}}})
    assert isinstance(m, InitMsg) and m.data.video_config.size() == (640, 360)
    g = CLIENT_ADAPTER.validate_python({"type": "GENERATE", "session_id": sid,
                                        "data": {"audio_chunk": {"data": "AAABAA=="}}})
    assert isinstance(g, GenerateMsg) and g.data.audio_chunk.pcm(2000).tolist() == [0, 1]
    assert g.data.audio_chunk.mislabelled(2) is False
    with pytest.raises(ValidationError):
        CLIENT_ADAPTER.validate_python({"type": "INIT", "session_id": sid,
                                        "data": {"user_id": "a b"}})
    with pytest.raises(ValidationError):  # odd width
        CLIENT_ADAPTER.validate_python({"type": "INIT", "data": {
            "user_id": "a", "video_config": {"resolution": "641x360"}}})
    with pytest.raises(ValueError, match="even byte count"):
        CLIENT_ADAPTER.validate_python({"type": "GENERATE", "session_id": sid, "data": {
            "audio_chunk": {"data": "AAAA"}}}).data.audio_chunk.pcm(2000)
    # messages without a payload need no data; session_id may be left out after INIT
    c = CLIENT_ADAPTER.validate_python({"type": "CLOSE"})
    assert c.session_id is None and c.data.reason is None


def test_a_text_frame_is_parsed_in_one_pass_and_refusals_say_why():
    """``validate_json`` reads the text directly; a failure is explained from the text."""
    g = CLIENT_ADAPTER.validate_json('{"type": "GENERATE", "session_id": null,'
                                     ' "data": {"audio_chunk": {"data": "AAABAA=="}}}')
    assert isinstance(g, GenerateMsg) and g.data.audio_chunk.pcm(2000).tolist() == [0, 1]

    def refusal(text: str) -> InvalidMessage:
        with pytest.raises(ValidationError) as info:
            CLIENT_ADAPTER.validate_json(text)
        return explain_invalid(text, info.value)

    assert refusal("{nope").message.startswith("message is not valid JSON: ")  # and why
    assert "JSON object" in refusal("[1]").message
    # a flat CLOSE would parse (CLOSE's data is optional, unknown keys are ignored): refused
    flat = refusal('{"type": "CLOSE", "session_id": null, "reason": "bye"}')
    assert flat.details["move_into_data"] == ["reason"]
    assert refusal('{"type": "DANCE", "data": {}}').message == "unknown message type 'DANCE'"
    bad = refusal('{"type": "ACTION", "data": {"action_index": 0}}')
    assert bad.details["errors"][0]["field"].endswith("action_index")


def test_settings_validate(monkeypatch):
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("MAX_SESSIONS", "3")
    s = Settings()
    assert s.port == 9123 and s.max_sessions == 3 and s.engine == "geometric"
    with pytest.raises(ValidationError):
        Settings(default_width=511)


# ---------------------------------------------------------------- avatar cache
def test_builtin_avatar_is_cached_and_reused_after_restart(tmp_path):
    calls = []
    store = AvatarStore(tmp_path, 256, 256, 25, lambda a, p: calls.append(a.avatar_id))
    first = store.ensure_builtin("default")
    assert set(first.base_videos) == {"idle", "listening", "speaking"}
    assert {"nod", "tilt"} <= set(first.actions)
    assert first.meta["report"]["face_found_in"] == 1
    mtime = (tmp_path / "default" / "meta.json").stat().st_mtime
    again = AvatarStore(tmp_path, 256, 256, 25, lambda a, p: calls.append(a.avatar_id))
    second = again.ensure_builtin("default")  # a restart: loaded, not rebuilt
    assert (tmp_path / "default" / "meta.json").stat().st_mtime == mtime
    assert np.abs(second.clip("idle").frames.astype(int) - first.clip("idle").frames.astype(int)).mean() < 3
    assert calls == ["default", "default"]  # the engine saw it both times
    assert not list(tmp_path.glob(".*.tmp"))


def test_env_example_documents_every_setting(monkeypatch):
    import re

    from .conftest import ROOT

    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_0-9]+)=", text, re.M))
    assert documented == {k.upper() for k in Settings.model_fields}
    # and the example parses as the defaults
    values = dict(re.findall(r"^([A-Z_0-9]+)=(.*)$", text, re.M))
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    parsed = Settings(_env_file=None)
    assert parsed.model_dump() == Settings.model_construct().model_dump()


def test_spec_documents_every_error_code_and_message_type():
    from websocket_service.errors import ERROR_CODES
    from websocket_service.protocol import CLIENT_TYPES

    from .conftest import ROOT

    spec = (ROOT / "musetalk_websocket_spec.md").read_text()
    missing = [c for c in ERROR_CODES + CLIENT_TYPES if f"`{c}`" not in spec]
    assert not missing, f"undocumented in the spec: {missing}"


# ---------------------------------------------------------------- face detector
def test_an_opencv_without_cascades_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV 5.x wheels ship no Haar cascades: say what to install, do not guess a face."""
    import cv2

    from websocket_service.avatars.face import FaceDetectorUnavailable, cascade, detect_face

    monkeypatch.setattr(cv2.data, "haarcascades", "/nonexistent/")
    cascade.cache_clear()
    try:
        with pytest.raises(FaceDetectorUnavailable, match=r"opencv-python-headless>=4\.8,<5") as exc:
            detect_face(np.zeros((64, 64, 3), np.uint8))
        assert exc.value.code == "PROCESSING_ERROR"  # a prepare job reports it as it is
    finally:
        monkeypatch.undo()
        cascade.cache_clear()
    assert detect_face(np.zeros((64, 64, 3), np.uint8)) is None  # the real cascades again


def test_the_negotiated_video_codec_is_read_from_the_answer() -> None:
    from websocket_service.transports.webrtc import _sends_h264

    head = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
    h264 = head + "m=video 9 UDP/TLS/RTP/SAVPF 97 98\r\na=rtpmap:97 H264/90000\r\na=rtpmap:98 VP8/90000\r\n"
    vp8 = head + "m=video 9 UDP/TLS/RTP/SAVPF 98 97\r\na=rtpmap:97 H264/90000\r\na=rtpmap:98 VP8/90000\r\n"
    assert _sends_h264(h264) and not _sends_h264(vp8) and not _sends_h264(head)


def test_fps_is_fixed_at_25_and_another_rate_is_refused_with_the_reason(monkeypatch):
    from websocket_service import units

    assert Settings().fps == units.FPS == 25
    assert units.SAMPLES_PER_FRAME * units.FPS == units.SAMPLE_RATE  # one frame's audio, no rest
    monkeypatch.setenv("FPS", "30")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "FPS must be 25" in str(err.value) and "640 samples" in str(err.value)
