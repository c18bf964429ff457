"""Conformance with the public MuseTalk WebSocket spec, through the real app and a real socket.

The first test talks to the server exactly as the spec's own Python example client does
(same message bodies, same order) with raw ``websockets`` and ``json``, and checks the shape
of every reply. The second walks the whole flow and checks what the frames show.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import av
import numpy as np
import websockets

from .conftest import FIXTURES
from .wsclient import Client, read_wav

ENVELOPE = {"type", "session_id", "data"}


class Recorder:
    """Reads the socket in the background; every message must be an envelope of our session."""

    def __init__(self, ws: Any, session_id: str) -> None:
        self.ws, self.session_id = ws, session_id
        self.messages: list[dict[str, Any]] = []
        self.decoder = av.CodecContext.create("h264", "r")
        self.pictures = 0
        self._new = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for raw in self.ws:
            m = json.loads(raw)
            assert set(m) == ENVELOPE, m.keys()
            assert m["session_id"] == self.session_id, m
            if m["type"] in ("VIDEO_FRAME", "ACTION_FRAME"):
                packet = base64.b64decode(m["data"]["frame_data"])
                self.pictures += len(self.decoder.decode(av.Packet(packet)))
            self.messages.append(m)
            self._new.set()

    async def wait_for(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for m in self.messages[seen:]:
                    if pred(m):
                        return m
                seen = len(self.messages)
                self._new.clear()
                await self._new.wait()

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == type_]


def upstream_chunk(pcm: bytes) -> dict[str, Any]:
    """The spec example's audio_chunk: 640 bytes labelled 40 ms (they are 20 ms)."""
    return {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1, "duration_ms": 40,
            "data": base64.b64encode(pcm).decode()}


async def test_the_spec_example_client_works_unchanged(server):
    session_id = str(uuid.uuid4())
    pcm = read_wav(FIXTURES / "short_16k.wav")[:640 * 40]  # 40 chunks of 640 bytes = 0.8 s
    async with websockets.connect(f"{server.ws}/musetalk/v1/ws/user123", max_size=2**24) as ws:
        # 1. INIT
        await ws.send(json.dumps({"type": "INIT", "session_id": session_id, "data": {
            "user_id": "user123", "auth_token": "eyJhbGciOiJIUzI1NiJ9.e30.sig",
            "video_config": {"resolution": "512x512", "fps": 25}}}))
        init = json.loads(await ws.recv())
        assert set(init) == ENVELOPE and init["type"] == "INIT_SUCCESS"
        assert init["session_id"] == session_id
        d = init["data"]
        assert d["model_loaded"] is True and d["streaming_started"] is True
        assert d["default_video"] == "idle_0" and d["default_video"] in d["available_videos"]
        assert {"idle_0", "speaking_0", "action_1", "action_2"} <= set(d["available_videos"])
        rec = Recorder(ws, session_id)

        # 2. watch the idle stream
        await rec.wait_for(lambda m: len(rec.of("VIDEO_FRAME")) >= 25)
        idle = rec.of("VIDEO_FRAME")
        for m in idle:
            f = m["data"]
            assert isinstance(f["frame_data"], str) and isinstance(f["frame_timestamp"], int)
            assert f["state"] == "idle" and f["base_video"] == "idle_0"
        assert idle[0]["data"]["keyframe"] and idle[0]["data"]["frame_timestamp"] == 0

        # 3. GENERATE with a video_state object, paced like the example (one chunk per 40 ms)
        async def generate(part: bytes) -> None:
            t0 = time.monotonic()
            for k, i in enumerate(range(0, len(part), 640)):
                await ws.send(json.dumps({"type": "GENERATE", "session_id": session_id, "data": {
                    "audio_chunk": upstream_chunk(part[i:i + 640]),
                    "video_state": {"type": "speaking", "base_video": "speaking_0"}}}))
                await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.04 - time.monotonic()))

        await generate(pcm[:640 * 20])
        changed = await rec.wait_for(lambda m: m["type"] == "STATE_CHANGED")
        assert changed["data"]["current_state"] == "speaking"
        assert changed["data"]["current_video"] == "speaking_0"

        # 4. ACTION by index (v1.1)
        await ws.send(json.dumps({"type": "ACTION", "session_id": session_id,
                                  "data": {"action_index": 1}}))
        trig = await rec.wait_for(lambda m: m["type"] == "ACTION_TRIGGERED")
        assert trig["data"]["action_index"] == 1 and trig["data"]["inserted"] is True

        # 5. GENERATE again
        await generate(pcm[640 * 20:])

        # the clip played inside the stream (VIDEO_FRAME, state action), then speech again
        await rec.wait_for(lambda m: m["type"] == "STATE_CHANGED"
                           and m["data"]["previous_state"] == "action")
        # 6. CLOSE
        await ws.send(json.dumps({"type": "CLOSE", "session_id": session_id, "data": {}}))
        ack = await rec.wait_for(lambda m: m["type"] == "CLOSE_ACK")
        assert ack["data"] == {"reason": "client_request"}
        await asyncio.wait_for(rec.task, 5)
        assert ws.close_code == 1000

    frames = rec.of("VIDEO_FRAME")
    assert not rec.of("ERROR"), rec.of("ERROR")
    assert rec.pictures == len(frames)  # every frame decoded to one picture
    # the 25-frame clip, lip-synced over the speech; the example's chunks are 20 ms each 40 ms,
    # so speech underruns and the last picture is held (still in the action) meanwhile
    states = [m["data"]["state"] for m in frames]
    first, last = states.index("action"), len(states) - states[::-1].index("action")
    assert set(states[first:last]) == {"action"} and last - first >= 25
    assert {m["data"]["base_video"] for m in frames[first:last]} == {"action_1"}
    speech = [m["data"] for m in frames if "utterance_frame" in m["data"]]
    assert len(speech) >= 15  # 0.8 s of audio is 20 frames; the rest may still be rendering
    assert {f["base_video"] for f in speech if f["state"] == "speaking"} == {"speaking_0"}
    with_audio = [f for f in speech if f["utterance_id"] == speech[0]["utterance_id"]]
    assert [f["frame_timestamp"] for f in with_audio] == [40 * f["utterance_frame"]
                                                         for f in with_audio]


def _closest_clip(img: np.ndarray, clips: dict[str, np.ndarray]) -> str:
    """The clip one of whose frames is nearest to ``img`` above the mouth (top 40 %)."""
    top = slice(0, int(img.shape[0] * 0.4))
    err = {name: min(float(np.abs(f[top].astype(int) - img[top].astype(int)).mean()) for f in fr)
           for name, fr in clips.items()}
    return min(err, key=err.__getitem__)


async def test_full_flow_speaking_video_actions_and_close(server):
    client, reply = await Client.connect(server.ws)
    avatar = server.services.store.cached("default")
    clips = {n: avatar.clip(c).frames for n, c in (("idle_0", "idle"), ("speaking_0", "speaking"))}
    await client.recv_frames(8)

    # STATE_CHANGE to a speaking_k video: later speech is rendered on it
    await client.msg("STATE_CHANGE", target_state="speaking", base_video="speaking_0")
    ev = await client.recv_until(lambda m: m["type"] == "STATE_CHANGED")
    assert (ev["previous_state"], ev["current_state"], ev["current_video"]) == \
        ("idle", "speaking", "speaking_0")
    pcm = read_wav(FIXTURES / "short_16k.wav")  # 1.2 s: 30 chunks of 40 ms
    await client.stream_audio(pcm)
    ended = await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
    speech = client.speaking()
    assert ended["frames"] == len(speech) == 30  # one lip-synced frame per 40 ms of audio
    assert [f["utterance_frame"] for f in speech] == list(range(30))
    assert [f["frame_timestamp"] for f in speech] == [40 * k for k in range(30)]
    assert {f["base_video"] for f in speech} == {"speaking_0"}
    shown = [client.images[client.frames.index(f)] for f in speech[::6]]
    assert [_closest_clip(img, clips) for img in shown] == ["speaking_0"] * len(shown)
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["current_state"] == "idle")

    # v1.1 ACTION: acknowledged, the clip inside the stream, then back to idle
    await client.msg("ACTION", action_index=2)
    trig = await client.recv_until(lambda m: m["type"] == "ACTION_TRIGGERED")
    assert (trig["action_index"], trig["inserted"], trig["action_type"]) == (2, True, "action_2")
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["previous_state"] == "action")
    v11 = [f for f in client.frames if f["state"] == "action"]
    assert len(v11) == trig["frames"] == len(avatar.clip("tilt"))
    assert all(f["type"] == "VIDEO_FRAME" and f["base_video"] == "action_2" for f in v11)

    # v1.0 ACTION with audio: ACTION_FRAMEs with progress, lip-synced, then back to idle
    await client.msg("ACTION", action_type="action_1",
                     audio_chunk={"data": base64.b64encode(pcm[:1280 * 10]).decode(),
                                  "format": "pcm_s16le", "sample_rate": 16000, "channels": 1,
                                  "duration_ms": 400})
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["previous_state"] == "action")
    v10 = [f for f in client.frames if f["type"] == "ACTION_FRAME"]
    assert len(v10) == len(avatar.clip("nod"))
    progress = [f["action_progress"] for f in v10]
    assert progress == sorted(progress) and 0 < progress[0] and progress[-1] == 1.0
    assert sum(f.get("utterance_frame") is not None for f in v10) == 10
    await client.recv_frames(5)  # STATE_CHANGED goes out just before the first frame after it
    assert client.frames[-1]["state"] == "idle"

    await client.msg("CLOSE")
    ack = await client.recv_until(lambda m: m["type"] == "CLOSE_ACK")
    assert ack["reason"] == "client_request"
    assert len(client.images) == len(client.frames)
    await client.close()
