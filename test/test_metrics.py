"""GET /metrics: Prometheus counters that only grow, across sessions opening and closing."""

from __future__ import annotations

import asyncio
import re

from .conftest import FIXTURES
from .wsclient import Client, read_wav


def scrape(server) -> dict[str, float]:
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def test_metrics_count_frames_speech_and_latency_across_sessions(server):
    before = scrape(server)
    assert before["avatar_sessions"] == 0 and before["avatar_sessions_max"] == 32
    pcm = read_wav(FIXTURES / "short_16k.wav")
    client, _ = await Client.connect(server.ws)
    client.decode = False
    await client.stream_audio(pcm)
    await client.recv_until(lambda m: m["type"] == "SPEECH_ENDED")
    live = scrape(server)
    assert live["avatar_sessions"] == 1
    # per session and per reader (the owner is reader "0")
    sid = client.session_id
    assert live[f'avatar_session_fps{{session="{sid}"}}'] > 20
    assert live[f'avatar_session_latency_p50_seconds{{session="{sid}"}}'] > 0
    assert live[f'avatar_session_viewers{{session="{sid}"}}'] == 0
    assert live[f'avatar_reader_kbit_s{{reader="0",session="{sid}"}}'] > 0
    assert live[f'avatar_reader_frames_dropped{{reader="0",session="{sid}"}}'] == 0
    assert 0 < live[f'avatar_reader_latency_seconds{{reader="0",session="{sid}"}}'] < 1
    assert live["avatar_speech_frames_total"] - before["avatar_speech_frames_total"] == 30
    assert live["avatar_audio_samples_total"] - before["avatar_audio_samples_total"] == len(pcm) // 2
    await client.close()
    for _ in range(50):
        after = scrape(server)
        if after["avatar_sessions"] == 0:
            break
        await asyncio.sleep(0.1)
    # the closed session's counters are kept: nothing went backwards
    assert after["avatar_sessions"] == 0
    assert after["avatar_sessions_opened_total"] == before["avatar_sessions_opened_total"] + 1
    assert after["avatar_frames_sent_total"] >= live["avatar_frames_sent_total"] > 0
    assert after["avatar_speech_frames_total"] == live["avatar_speech_frames_total"]
    hist = {k: v for k, v in after.items() if k.startswith("avatar_speech_latency_seconds_bucket")}
    counts = [hist[k] for k in sorted(hist, key=lambda k: float(re.search(r'le="([^"]+)"', k)[1]
                                                              .replace("+Inf", "inf")))]
    assert counts == sorted(counts) and counts[-1] == after["avatar_speech_latency_seconds_count"]
    assert after["avatar_speech_latency_seconds_count"] >= 30
