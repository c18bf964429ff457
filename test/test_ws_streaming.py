"""The streaming contract through the real app, a real socket and real H.264 decoding."""

from __future__ import annotations

import asyncio

import numpy as np

from .conftest import FIXTURES
from .wsclient import Client, read_wav


async def test_idle_stream_is_25fps_and_every_frame_decodes(server):
    client, reply = await Client.connect(server.ws)
    assert reply["type"] == "INIT_SUCCESS"
    assert reply["engine"] == "geometric" and reply["avatar"] == "default"
    assert reply["available_videos"] == ["idle_0", "idle_1", "speaking_0", "action_1", "action_2",
                                         "action_3"]
    assert reply["default_video"] == "idle_0" and reply["streaming_started"] is True
    assert reply["model_loaded"] is True
    clips = {v["name"]: (v["clip"], v["kind"]) for v in reply["videos"]}
    assert clips["idle_1"] == ("listening", "idle") and clips["action_1"] == ("nod", "action")
    frames = await client.recv_frames(100, timeout=30)
    # pacing: consecutive indices, timestamps exactly 40 ms apart (arrival times: bench/)
    idx = [f["frame_index"] for f in frames]
    assert idx == list(range(idx[0], idx[0] + len(idx))), "frames skipped or reordered"
    assert all(f["frame_timestamp"] == 40 * f["frame_index"] for f in frames)
    assert all(f["base_video"] == "idle_0" for f in frames)
    # H.264: first frame a keyframe, one keyframe per second (default GOP), SPS/PPS on each
    assert frames[0]["keyframe"] and frames[0]["frame_index"] == 0
    keys = [f["frame_index"] for f in frames if f["keyframe"]]
    assert keys[:4] == [0, 25, 50, 75]
    assert len(client.images) == len(client.frames)  # every frame decoded to one picture
    assert client.images[0].shape == (512, 512, 3)
    assert all(f["state"] == "idle" for f in frames)
    # the idle loop moves (it is a video, not a still)
    assert np.abs(client.images[10].astype(int) - client.images[30].astype(int)).mean() > 0.2
    await client.close()


async def test_speaking_frames_match_audio_and_return_to_idle(server):
    pcm = read_wav(FIXTURES / "short_16k.wav")  # 1.2 s -> 30 frames
    client, _ = await Client.connect(server.ws)
    await client.recv_frames(12)  # idle first
    await client.stream_audio(pcm)
    ended = await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["current_state"] == "idle")
    await client.recv_frames(8)  # the frames after the change
    speaking = client.speaking()
    assert len(speaking) == len(pcm) // 1280 == 30
    assert ended["frames"] == 30 and not ended["interrupted"]
    assert [f["utterance_frame"] for f in speaking] == list(range(30))
    assert len({f["utterance_id"] for f in speaking}) == 1
    assert all(f["state"] == "speaking" for f in speaking)
    changes = [(e["previous_state"], e["current_state"]) for e in client.events
               if e["type"] == "STATE_CHANGED"]
    assert changes == [("idle", "speaking"), ("speaking", "idle")]
    assert client.frames[-1]["state"] == "idle"
    info = server.get("/sessions").json()
    assert info["engine"]["name"] == "geometric"
    assert 0 < info["sessions"][0]["realtime_factor"] < 1.0  # the CPU engine keeps up
    # frames of the whole session are still one continuous, decodable stream
    idx = [f["frame_index"] for f in client.frames]
    assert idx == list(range(len(idx)))
    await client.close()


async def test_audio_faster_than_realtime_and_binary_pcm(server):
    pcm = read_wav(FIXTURES / "short_16k.wav")
    client, _ = await Client.connect(server.ws)
    # a TTS-style burst: the first half as JSON chunks of 200 ms, the rest as raw binary PCM
    half = 9600 * 2
    await client.stream_audio(pcm[:half], realtime=False, chunk=6400, end=False)
    await client.send(pcm[half:])
    await client.msg("END_OF_SPEECH")
    await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=10)
    assert [f["utterance_frame"] for f in client.speaking()] == list(range(30))
    await client.close()


async def test_uneven_chunks_are_rechunked(server):
    pcm = read_wav(FIXTURES / "short_16k.wav")
    client, _ = await Client.connect(server.ws)
    # 30 ms chunks (480 samples): 1.2 s still gives 30 frames
    await client.stream_audio(pcm, realtime=False, chunk=960)
    await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=10)
    assert len(client.speaking()) == 30
    await client.close()


async def test_interrupt_stops_speech_at_once(server):
    pcm = read_wav(FIXTURES / "speech_pauses_16k.wav")[: 32000 * 4]
    client, _ = await Client.connect(server.ws)
    await client.stream_audio(pcm, realtime=False, chunk=32000, end=False)
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["current_state"] == "speaking")
    await client.recv_frames(10)  # well into the speech
    await client.msg("INTERRUPT")
    ended = await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
    assert ended["interrupted"]
    n_at_interrupt = len(client.speaking())
    await client.recv_frames(12)  # half a second of stream after the interrupt
    assert len(client.speaking()) <= n_at_interrupt + 1
    assert len(client.speaking()) < 100
    assert client.frames[-1]["state"] == "idle"
    await client.close()


async def test_action_splices_clip_with_progress_and_returns(server):
    client, reply = await Client.connect(server.ws)
    await client.recv_frames(8)
    await client.msg("ACTION", action_type="nod")  # v1.0 form, by the clip's own name
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["current_state"] == "action")
    await client.recv_until(lambda m: m["type"] == "STATE_CHANGED" and m["previous_state"] == "action")
    await client.recv_frames(5)  # the frames after the clip
    acts = [f for f in client.frames if f["type"] == "ACTION_FRAME"]
    assert len(acts) == 25  # the nod clip's length
    prog = [f["action_progress"] for f in acts]
    assert prog == sorted(prog) and prog[-1] == 1.0
    assert all(a["action_type"] == "action_1" for a in acts)
    assert client.frames[-1]["state"] == "idle"
    # crossfade: no hard cut at the splice points (neighbouring frames stay close)
    i0 = client.frames.index(acts[0])
    steps = [np.abs(client.images[i].astype(int) - client.images[i - 1].astype(int)).mean()
             for i in range(i0, i0 + 26)]
    assert max(steps) < 12.0
    await client.close()


async def test_action_with_audio_is_lip_synced(server):
    pcm = read_wav(FIXTURES / "short_16k.wav")[: 1280 * 10]
    client, _ = await Client.connect(server.ws)
    import base64

    await client.msg("ACTION", action_type="action_2",
                     audio_chunk={"data": base64.b64encode(pcm).decode(), "duration_ms": 400})
    await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
    acts = [f for f in client.frames if f["type"] == "ACTION_FRAME"]
    synced = [f for f in acts if f.get("utterance_frame") is not None]
    assert len(synced) == 10
    await client.close()


async def test_base_video_switch(server):
    client, reply = await Client.connect(server.ws, video_config={"base_video": "listening"})
    assert reply["default_video"] == "idle_1"
    await client.recv_frames(5)
    assert client.frames[-1]["base_video"] == "idle_1"
    await client.msg("STATE_CHANGE", target_state="idle", base_video="idle_0")
    ev = await client.recv_until(lambda m: m["type"] == "STATE_CHANGED")
    assert ev["current_video"] == "idle_0" and ev["current_state"] == "idle"
    await client.recv_frames(5)  # the frames after the change
    assert client.frames[-1]["base_video"] == "idle_0"
    await client.close()


async def test_output_size_from_video_config(server):
    client, reply = await Client.connect(server.ws, video_config={"resolution": "256x320",
                                                                  "fps": 25})
    assert reply["video_config"]["resolution"] == "256x320"
    await client.recv_frames(1)
    assert client.images[0].shape == (320, 256, 3)
    await client.close()


async def test_disconnect_frees_the_session(server):
    client, _ = await Client.connect(server.ws)
    await client.recv_frames(1)
    assert server.get("/sessions").json()["count"] == 1
    client.ws.transport.abort()  # vanish without a closing handshake
    for _ in range(50):
        if server.get("/sessions").json()["count"] == 0:
            break
        await asyncio.sleep(0.1)
    assert server.get("/sessions").json()["count"] == 0


async def test_close_is_acknowledged(server):
    client, _ = await Client.connect(server.ws)
    await client.msg("CLOSE")
    ack = await client.recv_until(lambda m: m["type"] == "CLOSE_ACK")
    assert ack["reason"] == "client_request" and ack["session_id"] == client.session_id
    await client.ws.wait_closed()
    assert client.ws.close_code == 1000
