"""ENGINE=musetalk through the real service and socket, on a tiny random-weight model."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from websocket_service.avatars.model import Clip
from websocket_service.avatars.store import build_avatar, save_avatar

from .musetalk_tiny import speech, write_tiny_model
from .wsclient import Client, chunk_msg

os.environ["HF_HUB_OFFLINE"] = "1"
SIZE = 256


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def avatars_dir(tmp_path) -> Path:
    """A built-in avatar with static 2-frame clips (so idle frames equal the base exactly)."""
    av = build_avatar("default", [skdata.astronaut()], True, SIZE, SIZE)
    still = av.clips["idle"].frames[:1]
    av.clips = {n: Clip(n, c.kind, np.repeat(still, 2, axis=0)) for n, c in av.clips.items()}
    save_avatar(av, tmp_path)
    return tmp_path


@pytest.fixture
def mt_server(make_server, tiny_model, avatars_dir):
    return make_server(engine="musetalk", model_path=tiny_model, avatars_dir=avatars_dir,
                       device="cpu", default_width=SIZE, default_height=SIZE,
                       batch_wait_ms=40, max_buffered_audio_s=5, musetalk_max_streams=8,
                       batch_max=4)


async def test_musetalk_speaks_one_frame_per_chunk_touching_only_the_lower_face(mt_server):
    health = mt_server.get("/health").json()
    assert health["engine"] == "musetalk" and health["model_loaded"]
    client, reply = await Client.connect(mt_server.ws)
    assert reply["type"] == "INIT_SUCCESS" and reply["engine"] == "musetalk"
    await client.recv_frames(5, timeout=30)
    # the picture before encoding: idle frames are copied from the avatar's shared loop (its own
    # encoder), speech frames come from the session's encoder, so both are compared with it
    idle = mt_server.services.store.cached("default").clips["idle"].frames[0].astype(int)
    assert np.abs(client.images[-1] - idle).mean() < 3.0  # the idle loop shows the base
    pcm = speech(10).tobytes()
    for i in range(0, len(pcm), 1280):  # ten 40 ms chunks
        await client.send(chunk_msg(client.session_id, pcm[i : i + 1280]))
    await client.msg("END_OF_SPEECH")
    ended = await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=60)
    assert ended["frames"] == 10
    speaking = client.speaking()
    assert [f["utterance_frame"] for f in speaking] == list(range(10))
    imgs = [client.images[client.frames.index(f)].astype(int) for f in speaking]
    diff = np.mean([np.abs(im - idle).mean(axis=2) for im in imgs], axis=0)
    face = mt_server.services.store.cached("default").meta["face_box"]
    mid = face[1] + face[3] // 2
    # one H.264 encode of this 256x256 picture differs from it by ~1.5-2 levels on average
    assert diff[: face[1]].mean() < 3.0, "pixels above the face changed"
    assert diff[mid:].max() > 20, "the lower face did not change"
    await client.close()


async def test_two_sessions_share_forward_passes(make_server, tiny_model, avatars_dir):
    # the core waits up to 100 ms (the most it may) for a full batch (16 frames: both
    # sessions' 8), and the frames' deadline is far (2 s), so on a loaded machine the second
    # session's frames still join the first session's in a pass
    mt_server = make_server(engine="musetalk", model_path=tiny_model, avatars_dir=avatars_dir,
                            device="cpu", default_width=SIZE, default_height=SIZE,
                            batch_wait_ms=100, batch_max=16, max_buffered_audio_s=5,
                            musetalk_max_streams=8, musetalk_deadline_ms=2000)
    a, _ = await Client.connect(mt_server.ws, "a")
    b, _ = await Client.connect(mt_server.ws, "b")
    a.decode = b.decode = False
    for c, seed in ((a, 1), (b, 2)):
        await c.send(chunk_msg(c.session_id, speech(8, seed).tobytes()))
        await c.msg("END_OF_SPEECH")
    done = await asyncio.gather(
        a.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=60),
        b.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=60))
    assert [d["frames"] for d in done] == [8, 8]
    stats = await asyncio.to_thread(mt_server.services.engine.stats_now)
    assert stats["sessions_per_batch_max"] >= 2, stats
    info = mt_server.get("/sessions").json()  # the figures it shows are at most a second old
    assert info["engine"]["name"] == "musetalk" and info["engine"]["realtime_factor"] > 0
    assert len(info["sessions"]) == 2
    assert all(s["realtime_factor"] > 0 for s in info["sessions"])
    await a.close()
    await b.close()


async def test_gpu_standin_serves_through_the_socket_and_admits_what_it_can(make_server,
                                                                           avatars_dir):
    """GPU_STANDIN: no model files; /health says so; past the admission limit a session is
    refused at INIT with RATE_LIMIT_EXCEEDED and close 1013, the others go on speaking."""
    server = make_server(engine="musetalk", gpu_standin="h100", avatars_dir=avatars_dir,
                         default_width=SIZE, default_height=SIZE, musetalk_max_streams=2,
                         model_path=avatars_dir / "no-models-here")
    health = server.get("/health").json()
    assert health["engine_info"]["gpu_standin"] == "h100"
    assert health["engine_info"]["inference_process"]["separate"] is True
    assert health["event_loop_lag_ms"]["samples"] >= 0
    a, ra = await Client.connect(server.ws, "a")
    b, rb = await Client.connect(server.ws, "b")
    assert ra["type"] == rb["type"] == "INIT_SUCCESS"
    c, rc = await Client.connect(server.ws, "c")
    assert rc["type"] == "ERROR" and rc["code"] == "RATE_LIMIT_EXCEEDED", rc
    assert rc["details"] == {"streams": 2, "limit": 2}
    await c.ws.wait_closed()
    assert c.ws.close_code == 1013
    a.decode = False
    await a.send(chunk_msg(a.session_id, speech(8, 3).tobytes()))
    await a.msg("END_OF_SPEECH")
    done = await a.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=60)
    assert done["frames"] == 8
    await a.close()
    await b.close()


def test_musetalk_demanded_without_weights_fails_fast(tmp_path, avatars_dir):
    from fastapi.testclient import TestClient

    from websocket_service.app import create_app
    from websocket_service.config import Settings
    from websocket_service.errors import ModelNotFound
    from websocket_service.manager import Services

    settings = Settings(_env_file=None, engine="musetalk", model_path=tmp_path / "nothing",
                        avatars_dir=avatars_dir)
    with pytest.raises(ModelNotFound) as exc:
        Services(settings)
    missing = str(tmp_path / "nothing")
    assert missing in exc.value.message and exc.value.details["file"].startswith(missing)
    auto = Services(Settings(_env_file=None, engine="auto", model_path=tmp_path / "nothing",
                             avatars_dir=avatars_dir))
    assert auto.engine.name == "geometric"
    with TestClient(create_app(auto.settings, auto)) as client:  # it serves, on the fallback
        health = client.get("/health").json()
    assert health["engine"] == "geometric" and health["model_loaded"]
