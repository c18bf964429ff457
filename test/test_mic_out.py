"""Microphone audio out: what an aiortc peer sends comes out of /musetalk/v1/mic/{session_id}."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from websocket_service.config import Settings

from .live_server import live_server
from .rtc_client import ClientPeer, WavTrack, read_wav

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(avatars_dir=tmp_path_factory.mktemp("avatars"),
                        rtc_host_addresses=["127.0.0.1"], default_width=256, default_height=256)
    with live_server(settings) as url:
        yield url


def envelope_rms(pcm: np.ndarray, hop: int = 640) -> np.ndarray:
    n = len(pcm) // hop
    return np.sqrt(np.mean(pcm[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1))


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    """Highest Pearson r of ``a`` against ``b`` shifted by 0..max_lag hops."""
    best = -1.0
    for lag in range(max_lag + 1):
        x, y = a[lag:], b[: len(a) - lag]
        n = min(len(x), len(y))
        if n > 10 and x[:n].std() > 0 and y[:n].std() > 0:
            best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


async def test_the_peers_microphone_comes_out_as_timestamped_pcm(base_url: str) -> None:
    speech = read_wav("short_16k.wav")
    client = ClientPeer(WavTrack(speech, lead_s=0.3))
    mic_url = base_url.replace("http", "ws") + "/musetalk/v1/mic/"
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
        offer = await client.offer()
        r = await http.post("/offer", json={"sdp": offer.sdp, "type": offer.type, "user_id": "m"})
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        async with websockets.connect(mic_url + sid, max_size=2**22) as ws:
            await client.accept(r.json()["sdp"])
            got: list[dict[str, Any]] = []
            async with asyncio.timeout(20):
                while sum(m["data"]["samples"] for m in got) < 16000 * 2:  # 2 s of it
                    got.append(json.loads(await ws.recv()))
            await client.close()
            # the session ends with the peer: the mic socket closes normally
            async with asyncio.timeout(10):
                with pytest.raises(websockets.ConnectionClosedOK):
                    while True:
                        await ws.recv()
    assert {m["type"] for m in got} == {"MIC_AUDIO"} and {m["session_id"] for m in got} == {sid}
    assert {m["data"]["sample_rate"] for m in got} == {16000}
    assert max(m["data"]["dropped"] for m in got) == 0
    # gapless: each piece starts where the previous one ended
    starts = [m["data"]["timestamp_ms"] for m in got]
    ends = np.cumsum([0] + [m["data"]["samples"] for m in got]) * 1000 // 16000
    assert starts == [int(e) for e in ends[:-1]]
    pcm = np.concatenate([np.frombuffer(base64.b64decode(m["data"]["data"]), "<i2") for m in got])
    assert np.abs(pcm).max() > 1000  # the speech, not silence
    # what came out follows what was sent (through Opus): loudness envelopes correlate
    sent = envelope_rms(np.concatenate([np.zeros(4800, np.int16), speech]))
    assert best_correlation(envelope_rms(pcm), sent, max_lag=25) > 0.8


async def test_mic_for_an_unknown_session_is_refused(base_url: str) -> None:
    async with websockets.connect(base_url.replace("http", "ws") + "/musetalk/v1/mic/nope") as ws:
        err = json.loads(await ws.recv())
        assert err["type"] == "ERROR" and err["data"]["code"] == "INVALID_SESSION"
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008
