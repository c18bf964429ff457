"""Recording a session: REST start/stop, the MP4 plays back with the right duration and audio."""

from __future__ import annotations

import asyncio
import io

import av
import httpx
import numpy as np

from .conftest import FIXTURES
from .wsclient import Client, read_wav


async def test_a_recording_is_the_stream_remuxed_with_its_audio(make_server, tmp_path):
    server = make_server(recordings_dir=tmp_path / "rec")
    client, _ = await Client.connect(server.ws)
    client.decode = False
    await client.recv_frames(5)
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        r = await http.post(f"/sessions/{client.session_id}/recording")
        assert r.status_code == 201, r.text
        rid = r.json()["recording_id"]
        again = await http.post(f"/sessions/{client.session_id}/recording")
        assert again.status_code == 404 and again.json()["code"] == "INVALID_SESSION"
        wav = read_wav(FIXTURES / "short_16k.wav")  # 1.2 s of speech
        await client.recv_frames(10)  # idle into the file first
        await client.stream_audio(wav)
        await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
        await client.recv_frames(15)  # 10 + 30 + 15 frames since the recording began
        r = await http.delete(f"/sessions/{client.session_id}/recording")
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["status"] == "done" and info["frames"] > 50
        mp4 = await http.get(f"/recordings/{rid}")
        assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
        listed = (await http.get("/recordings")).json()
        assert [x["recording_id"] for x in listed["recordings"]] == [rid]
    await client.close()

    with av.open(io.BytesIO(mp4.content)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert (v.codec_context.width, v.codec_context.height) == (512, 512)
        pictures = sum(1 for _ in c.decode(video=0))
    assert pictures == info["frames"]  # every remuxed packet decodes, none lost
    with av.open(io.BytesIO(mp4.content)) as c:
        rs = av.AudioResampler(format="s16", layout="mono", rate=16000)
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for fr in c.decode(audio=0)
                              for f in rs.resample(fr)])
    # the right duration (AAC adds at most a frame of priming) and the speech in it
    assert abs(len(pcm) - info["frames"] * 640) <= 2048 + 640
    assert abs(info["duration_s"] - info["frames"] / 25) < 1e-6
    wav_i = np.frombuffer(wav, "<i2")
    assert np.abs(pcm).max() > 0.5 * np.abs(wav_i).max()
    loud = np.abs(pcm.astype(int)) > 1000
    assert 0.5 < loud.sum() / (np.abs(wav_i.astype(int)) > 1000).sum() < 1.5


async def test_a_full_recordings_folder_refuses_with_507(make_server, tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "old.mp4").write_bytes(b"\0" * (2 * 2**20))
    server = make_server(recordings_dir=folder, max_recordings_mb=1)
    client, _ = await Client.connect(server.ws)
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        r = await http.post(f"/sessions/{client.session_id}/recording")
        assert r.status_code == 507
        body = r.json()
        assert body["code"] == "RATE_LIMIT_EXCEEDED" and "MAX_RECORDINGS_MB" in body["message"]
        assert (await http.delete(f"/sessions/{client.session_id}/recording")).status_code == 404
        assert (await http.get("/recordings/nope")).status_code == 404
    await client.close()


async def test_closing_the_session_finishes_its_recording(make_server, tmp_path):
    server = make_server(recordings_dir=tmp_path / "rec")
    client, _ = await Client.connect(server.ws)
    client.decode = False
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        rid = (await http.post(f"/sessions/{client.session_id}/recording")).json()["recording_id"]
        await client.recv_frames(25)  # a second into the file
        await client.msg("CLOSE")
        await client.recv_until(lambda m: m["type"] == "CLOSE_ACK")
        await client.ws.wait_closed()
        for _ in range(50):  # polling a remote server: it finishes the file as the session closes
            got = (await http.get("/recordings")).json()["recordings"]
            listed = {x["recording_id"]: x for x in got}
            if listed[rid]["status"] == "done":
                break
            await asyncio.sleep(0.1)
        assert listed[rid]["status"] == "done" and listed[rid]["frames"] > 10
        assert (await http.get(f"/recordings/{rid}")).status_code == 200
