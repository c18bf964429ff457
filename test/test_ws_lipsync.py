"""Lip-sync quality measured on the decoded H.264 frames that reach a WebSocket client.

The mouth opening is extracted from the output pictures by image analysis
(``bench/mouth_metrics.py``), never from the engine's parameters.
"""

from __future__ import annotations

import numpy as np

from bench.mouth_metrics import evaluate

from .conftest import FIXTURES
from .wsclient import Client, read_wav


async def test_mouth_follows_loudness_and_stays_closed_in_pauses(server):
    raw = read_wav(FIXTURES / "speech_pauses_16k.wav")
    client, _ = await Client.connect(server.ws)
    await client.recv_frames(8)
    idle_ref = client.images[-1]
    # TTS-style: the whole utterance in 1 s chunks, as fast as the server accepts it
    await client.stream_audio(raw, realtime=False, chunk=32000)
    ended = await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED", timeout=30)
    speaking = client.speaking()
    assert ended["frames"] == len(speaking) == -(-len(raw) // 1280)
    frames = [client.images[client.frames.index(f)] for f in speaking]
    face = server.get("/avatars/default").json()["face_box"]
    pcm = np.frombuffer(raw, "<i2")
    result = evaluate(frames, pcm, face, [idle_ref] * len(frames))
    assert result["r"] >= 0.6, result
    assert result["silence_ratio"] < 0.2, result
    await client.close()
