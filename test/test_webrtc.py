"""The WebRTC transport end to end: real app over uvicorn, an aiortc client on loopback."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import aioice.stun
import httpx
import pytest
import websockets

from websocket_service.config import Settings
from websocket_service.transports.webrtc import _sends_h264

from .live_server import live_server
from .rtc_client import ClientPeer, WavTrack, read_wav
from .support import until
from .wsclient import next_of_type

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _settings(avatars: Path, **kw: object) -> Settings:
    return Settings(avatars_dir=avatars, rtc_host_addresses=["127.0.0.1"], default_width=256,
                    default_height=256, max_rtc_clients=2, **kw)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_server(_settings(tmp_path_factory.mktemp("avatars"))) as url:
        yield url


async def _sessions(http: httpx.AsyncClient) -> dict:
    r = await http.get("/sessions")
    r.raise_for_status()
    return r.json()


async def _wait_no_sessions(http: httpx.AsyncClient, timeout: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await _sessions(http))["count"]:  # noqa: ASYNC110 - polling a remote server
        assert asyncio.get_running_loop().time() < deadline, "sessions were not freed"
        await asyncio.sleep(0.1)


async def test_offer_streams_video_and_audio_and_lip_syncs_the_mic(base_url: str) -> None:
    mic = WavTrack(read_wav("short_16k.wav"), lead_s=0.6)
    client = ClientPeer(mic)
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
        offer = await client.offer()
        r = await http.post("/offer", json={"sdp": offer.sdp, "type": offer.type, "user_id": "py"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["type"] == "answer" and answer["session_id"]
        assert "127.0.0.1" in answer["sdp"] and "a=end-of-candidates" in answer["sdp"]
        assert "H264" in answer["sdp"].split("m=video")[1]
        assert _sends_h264(answer["sdp"])  # H.264 first: the session's own packets are sent
        await client.accept(answer["sdp"])
        await client.wait_connected()
        # the mic's speech comes back lip-synced, with its audio (frame rates: bench/)
        await until(lambda: client.video_frames > 75 and client.audio_frames > 50
                     and client.audio_peak > 1000)
        assert client.video_size == (256, 256)

        detail = (await http.get(f"/sessions/{answer['session_id']}")).json()
        assert detail["transport"] == "webrtc"
        assert detail["speech_frames"] > 0, detail
        assert len(detail["readers"]) == 1 and detail["readers"][0]["sent"] > 50  # one feed
        assert detail["rtc"]["connection_state"] == "connected"
        assert "video_sent" in detail["rtc"]
        assert client.audio_peak > 1000, "the lip-synced speech should come back as audio"

        await client.close()
        await _wait_no_sessions(http)


async def test_vp8_fallback_for_a_client_without_h264(base_url: str) -> None:
    client = ClientPeer(video_codecs=("video/VP8",))
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
        offer = await client.offer()
        assert "H264" not in offer.sdp.split("m=video")[1].split("m=")[0]
        r = await http.post("/offer", json={"sdp": offer.sdp, "type": offer.type, "user_id": "vp8"})
        assert r.status_code == 200, r.text
        video = r.json()["sdp"].split("m=video")[1].split("m=")[0]
        assert "VP8" in video and "H264" not in video
        await client.accept(r.json()["sdp"])
        await client.wait_connected()
        await until(lambda: client.video_frames > 25)
        await client.close()
        await _wait_no_sessions(http)


async def test_rest_audio_action_interrupt_for_an_offer_session(base_url: str) -> None:
    client = ClientPeer()
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
        offer = await client.offer()
        r = await http.post("/offer", json={"sdp": offer.sdp, "type": "offer", "user_id": "tts"})
        sid = r.json()["session_id"]
        await client.accept(r.json()["sdp"])
        await client.wait_connected()
        pcm = read_wav("short_16k.wav")
        r = await http.post(f"/sessions/{sid}/audio", content=pcm.tobytes(),
                            headers={"content-type": "application/octet-stream"},
                            params={"end_of_speech": "true"})
        assert r.status_code == 202, r.text
        async with asyncio.timeout(15):
            while (await http.get(f"/sessions/{sid}")).json()["speech_frames"] == 0:
                await asyncio.sleep(0.05)
        assert (await http.post(f"/sessions/{sid}/interrupt")).status_code == 200
        r = await http.post(f"/sessions/{sid}/action/nod")
        assert r.status_code == 202, r.text
        r = await http.post(f"/sessions/{sid}/action/dance")
        assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"
        r = await http.post(f"/sessions/{sid}/audio", content=b"\x01",
                            headers={"content-type": "application/octet-stream"})
        assert r.status_code == 400 and r.json()["code"] == "INVALID_MESSAGE"
        await client.close()
        await _wait_no_sessions(http)


async def test_offer_errors_use_the_error_body(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
        r = await http.post("/offer", json={"sdp": "v=0\r\nbogus", "type": "offer", "user_id": "x"})
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "INVALID_MESSAGE"
        r = await http.post("/offer", json={"sdp": "v=0", "type": "offer", "user_id": "bad id!"})
        assert r.status_code == 400 and r.json()["code"] == "INVALID_MESSAGE"
        r = await http.post("/sessions/nope/interrupt")
        assert r.status_code == 404 and r.json()["code"] == "INVALID_SESSION"
        assert (await _sessions(http))["count"] == 0


async def test_signaling_websocket(base_url: str) -> None:
    url = base_url.replace("http", "ws") + "/musetalk/v1/rtc/sig"
    client = ClientPeer()
    async with websockets.connect(url) as ws, httpx.AsyncClient(base_url=base_url) as http:
        await ws.send(json.dumps({"type": "ping", "t": 42}))
        assert (await next_of_type(ws, "pong"))["t"] == 42
        await ws.send(json.dumps({"type": "hello"}))
        err = await next_of_type(ws, "error")
        assert err["code"] == "INVALID_MESSAGE"
        offer = await client.offer()
        await ws.send(json.dumps({"type": "offer", "sdp": offer.sdp}))
        answer = await next_of_type(ws, "answer")
        await client.accept(answer["sdp"])
        connected = await next_of_type(ws, "connected")
        assert connected["session_id"] == answer["session_id"]
        await client.wait_connected()

        # one slot is taken by this socket, one by a second; a third is refused
        async with websockets.connect(url):
            async with websockets.connect(url) as third:
                refused = json.loads(await third.recv())
                assert refused["type"] == "error" and refused["code"] == "RATE_LIMIT_EXCEEDED"
                await asyncio.wait_for(third.wait_closed(), 5)
                assert third.close_code == 1013

        r = await http.post(f"/sessions/{answer['session_id']}/action/nod")
        assert r.status_code == 202
        changed = await next_of_type(ws, "STATE_CHANGED")  # the session's events: protocol envelopes
        assert changed["session_id"] == answer["session_id"]
        assert changed["data"]["current_state"] == "action"
        assert changed["data"]["current_video"] == "action_1"

        await ws.send(json.dumps({"type": "bye"}))
        gone = await next_of_type(ws, "disconnected")
        assert gone["session_id"] == answer["session_id"]
        await _wait_no_sessions(http)
    await client.close()


async def test_ice_failure_is_reported_on_the_signaling_socket(
        base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # make aioice give up on a dead pair in well under a second instead of ~30 s
    monkeypatch.setattr(aioice.stun, "RETRY_MAX", 1)
    monkeypatch.setattr(aioice.stun, "RETRY_RTO", 0.05)
    url = base_url.replace("http", "ws") + "/musetalk/v1/rtc/doomed"
    client = ClientPeer()
    offer = await client.offer()
    # the client's only candidate now points at a port nobody answers on, and the client
    # never applies the answer, so no check can succeed
    dead = re.sub(r"(candidate:\S+ 1 udp \d+ 127\.0\.0\.1) \d+", r"\1 9", offer.sdp)
    async with websockets.connect(url) as ws, httpx.AsyncClient(base_url=base_url) as http:
        await ws.send(json.dumps({"type": "offer", "sdp": dead}))
        answer = await next_of_type(ws, "answer")
        err = await next_of_type(ws, "error", timeout=15)
        assert err["code"] == "PROCESSING_ERROR" and err["details"]["reason"] == "ice_failed"
        gone = await next_of_type(ws, "disconnected")
        assert gone["session_id"] == answer["session_id"]
        await _wait_no_sessions(http)
    await client.close()
