"""The management API (/api/webrtc/...) and receive-only viewers, through the real app."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from websocket_service.config import Settings
from websocket_service.engines.geometric import GeometricEngine
from websocket_service.errors import ModelNotFound
from websocket_service.realtime import AudioFeeder, read_audio

from .live_server import LiveServer, MakeServer
from .rtc_client import ClientPeer, WavTrack, read_wav
from .support import face_photo, poll, until, wait_job, wait_until, write_wav
from .wsclient import next_of_type

API = "/api/webrtc"


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """MEDIA_DIR with a face photo, a 44.1 kHz stereo WAV, and ways out of it."""
    root = tmp_path / "media"
    (root / "faces").mkdir(parents=True)
    face_photo(root / "faces" / "still.png")
    speech = read_wav("speech_pauses_16k.wav")
    write_wav(root / "speech_44k_stereo.wav", np.concatenate([speech, speech]), 44100, 2)
    (root / "notes.txt").write_text("not media")
    (root / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    (tmp_path / "secret.png").write_bytes((root / "faces" / "still.png").read_bytes())
    (tmp_path / "secret.wav").write_bytes((root / "speech_44k_stereo.wav").read_bytes())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(tmp_path / "secret.wav", root / "link.wav")
    os.symlink(tmp_path, root / "outside")
    return root


def _escapes(media: Path, name: str) -> list[str]:
    """Paths that lead out of ``media`` to ``media.parent / name`` (which exists)."""
    stem, suffix = name.split(".")
    return [f"../{name}", f"faces/../../{name}", str(media.parent / name), f"outside/{name}",
            f"link.{suffix}", "/etc/passwd", f"faces/../../{media.name}/../{stem}.{suffix}"]


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.request.url, r.status_code, r.text)
    body = r.json()
    assert body["code"] == code and body["message"] and isinstance(body["details"], dict), body
    return body


# ------------------------------------------------------------------ status and initialize

def test_status_reports_engine_and_loaded_avatars(server: LiveServer) -> None:
    st = server.get(f"{API}/musetalk/status").json()
    assert st == {"initialized": True, "current_avatar": "default", "loaded_avatars": ["default"],
                  "engine": "geometric", "demo_mode": False, "demo_reason": None}


def test_demo_mode_when_musetalk_cannot_load(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server(engine="auto", model_path=tmp_path / "no-weights")
    st = server.get(f"{API}/musetalk/status").json()
    assert st["engine"] == "geometric" and st["initialized"] and st["demo_mode"]
    assert "MODEL_PATH" in st["demo_reason"] and str(tmp_path / "no-weights") in st["demo_reason"]
    r = httpx.post(f"{server.http}{API}/avatar/initialize")
    assert r.status_code == 200 and r.json() == {"status": "success", "engine": "geometric",
                                                 "demo_mode": True}


class FirstLoadFails(GeometricEngine):
    """A weight-free engine that starts unloaded and whose first load() fails."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.loaded = False
        self.attempts = 0

    def load(self) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise ModelNotFound("missing weight file musetalkV15/unet.pth",
                                {"file": "musetalkV15/unet.pth"}, fatal=True)
        self.loaded = True

    def info(self) -> dict[str, Any]:
        return {**super().info(), "loaded": self.loaded}


def test_initialize_loads_once_and_a_failure_is_503(make_server: MakeServer) -> None:
    server = make_server(FirstLoadFails)
    engine = server.services.engine
    with httpx.Client(base_url=server.http, timeout=30) as http:
        assert http.get(f"{API}/musetalk/status").json()["initialized"] is False
        body = _error(http.post(f"{API}/avatar/initialize"), 503, "MODEL_NOT_FOUND")
        assert "unet.pth" in body["message"] and body["details"]["file"] == "musetalkV15/unet.pth"
        assert http.get(f"{API}/musetalk/status").json()["initialized"] is False
        for _ in range(2):  # idempotent: the second call finds it loaded
            r = http.post(f"{API}/avatar/initialize")
            assert r.status_code == 200 and r.json()["status"] == "success", r.text
        assert engine.attempts == 2
        assert http.get(f"{API}/musetalk/status").json()["initialized"] is True


def test_every_management_route_needs_the_bearer_token(make_server: MakeServer,
                                                        media: Path) -> None:
    server = make_server(auth_token="s3cret", media_dir=media)
    routes = [("GET", f"{API}/musetalk/status", {}), ("POST", f"{API}/avatar/initialize", {}),
              ("POST", f"{API}/avatar/prepare", {"avatar_id": "a", "video_path": "faces/still.png"}),
              ("POST", f"{API}/realtime/start", {"session_id": "s"}),
              ("POST", f"{API}/realtime/stop", {"session_id": "s"})]
    with httpx.Client(base_url=server.http, timeout=30) as http:
        for method, path, params in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = http.request(method, path, params=params, headers=headers)
                _error(r, 401, "AUTH_FAILED")
                assert r.headers["www-authenticate"] == "Bearer"
        assert server.services.store.running_jobs() == 0 and not server.services.sessions.sessions
        good = {"Authorization": "Bearer s3cret"}
        answers = [http.request(m, p, params=q, headers=good) for m, p, q in routes]
        assert [r.status_code for r in answers] == [200, 200, 202, 200, 200]
        job = http.get(answers[2].json()["status_url"], headers=good)
        assert job.status_code == 200
        # let the preparation finish before the server stops
        wait_until(lambda: not server.services.store.running_jobs(), 60, "the preparation")


# ------------------------------------------------------------------ prepare

def test_prepare_from_media_dir_lists_the_avatar(make_server: MakeServer, media: Path) -> None:
    server = make_server(media_dir=media)
    with httpx.Client(base_url=server.http, timeout=30) as http:
        r = http.post(f"{API}/avatar/prepare",
                      params={"avatar_id": "astro", "video_path": "faces/still.png"})
        assert r.status_code == 202, r.text
        assert r.json()["avatar_id"] == "astro" and r.json()["status_url"].startswith("/jobs/")
        job = wait_job(http, r.json()["status_url"])
        assert job["status"] == "done" and job["progress"] == 1.0, job
        assert "astro" in http.get(f"{API}/musetalk/status").json()["loaded_avatars"]
        assert "astro" in [a["avatar_id"] for a in http.get("/avatars").json()["avatars"]]
        # an absolute path is fine when it points inside MEDIA_DIR
        r = http.post(f"{API}/avatar/prepare",
                      params={"avatar_id": "astro2", "video_path": str(media / "faces/still.png")})
        assert r.status_code == 202, r.text
        assert wait_job(http, r.json()["status_url"])["status"] == "done"


def test_prepare_refuses_paths_out_of_media_dir(make_server: MakeServer, media: Path) -> None:
    server = make_server(media_dir=media)
    with httpx.Client(base_url=server.http, timeout=30) as http:
        for bad in _escapes(media, "secret.png"):
            r = http.post(f"{API}/avatar/prepare", params={"avatar_id": "x", "video_path": bad})
            _error(r, 400, "INVALID_MESSAGE")
        _error(http.post(f"{API}/avatar/prepare", params={"avatar_id": "x", "video_path": "nope.png"}),
               404, "MODEL_NOT_FOUND")
        _error(http.post(f"{API}/avatar/prepare", params={"avatar_id": "x", "video_path": "notes.txt"}),
               400, "INVALID_MESSAGE")
        _error(http.post(f"{API}/avatar/prepare",
                         params={"avatar_id": "bad id", "video_path": "faces/still.png"}),
               400, "INVALID_MESSAGE")
        _error(http.post(f"{API}/avatar/prepare", params={"avatar_id": "x"}), 400, "INVALID_MESSAGE")
        # the old form field of POST /prepare_avatar resolves the same way
        r = http.post("/prepare_avatar/u1", data={"path": "link.png"})
        _error(r, 400, "INVALID_MESSAGE")
        assert server.services.store.running_jobs() == 0
        assert "x" not in http.get(f"{API}/musetalk/status").json()["loaded_avatars"]


# ------------------------------------------------------------------ realtime sessions

@pytest.mark.parametrize(("rate", "channels", "width"), [(44100, 2, 2), (8000, 1, 1), (16000, 1, 2)])
def test_read_audio_resamples_any_wav_to_16k_mono(tmp_path: Path, rate: int, channels: int,
                                                  width: int) -> None:
    pcm = read_wav("short_16k.wav")
    path = tmp_path / "in.wav"
    write_wav(path, pcm, rate, channels, width)
    out = read_audio(path)
    assert out.dtype == np.int16 and out.ndim == 1
    assert abs(len(out) - len(pcm)) <= 16000 * 0.01, (len(out), len(pcm))
    n = min(len(out), len(pcm))
    a, b = out[:n].astype(np.float64), pcm[:n].astype(np.float64)
    if rate < 16000:  # 8 kHz keeps only the band below 4 kHz: compare that band
        b = np.convolve(b, np.hanning(9) / np.hanning(9).sum(), "same")
        a = np.convolve(a, np.hanning(9) / np.hanning(9).sum(), "same")
    best = max(np.corrcoef(np.roll(a, lag), b)[0, 1] for lag in range(-40, 41))
    assert best > 0.9, best


def test_realtime_start_errors(make_server: MakeServer, media: Path) -> None:
    server = make_server(media_dir=media)
    with httpx.Client(base_url=server.http, timeout=30) as http:
        start = f"{API}/realtime/start"
        for bad in _escapes(media, "secret.wav"):
            _error(http.post(start, params={"audio_path": bad}), 400, "INVALID_MESSAGE")
        _error(http.post(start, params={"audio_path": "missing.wav"}), 404, "MODEL_NOT_FOUND")
        _error(http.post(start, params={"audio_path": "broken.wav"}), 422, "PROCESSING_ERROR")
        _error(http.post(start, params={"avatar_id": "ghost"}), 404, "MODEL_NOT_FOUND")
        _error(http.post(start, params={"session_id": "no spaces"}), 400, "INVALID_MESSAGE")
        assert http.get("/sessions").json()["count"] == 0

        r = http.post(start, params={"session_id": "idle-1"})
        assert r.status_code == 200 and r.json() == {"session_id": "idle-1", "status": "started",
                                                     "avatar_id": "default", "audio_seconds": 0.0}
        _error(http.post(start, params={"session_id": "idle-1"}), 409, "INVALID_SESSION")
        listed = http.get("/sessions").json()
        assert listed["count"] == 1 and listed["sessions"][0]["transport"] == "server"
        r = http.post(f"{API}/realtime/stop", params={"session_id": "idle-1"})
        assert r.status_code == 200 and r.json() == {"session_id": "idle-1", "status": "stopped"}
        _error(http.post(f"{API}/realtime/stop", params={"session_id": "idle-1"}), 404,
               "INVALID_SESSION")
        assert http.get("/sessions").json()["count"] == 0


def test_shutdown_closes_realtime_sessions_and_their_feeders(make_server: MakeServer,
                                                            media: Path) -> None:
    server = make_server(media_dir=media)
    r = httpx.post(f"{server.http}{API}/realtime/start",
                   params={"session_id": "left-running", "audio_path": "speech_44k_stereo.wav"})
    assert r.status_code == 200, r.text
    mgr = server.services.sessions
    session = mgr.get("left-running")
    (feeder,) = mgr.attachments("left-running")
    assert isinstance(feeder, AudioFeeder)
    server.stop()
    assert not server.thread.is_alive() and mgr.sessions == {} and session.sinks == []
    assert feeder.done.is_set() and 0 < feeder.pushed < len(feeder.pcm)


async def test_realtime_session_from_a_wav_with_three_viewers(make_server: MakeServer,
                                                              media: Path) -> None:
    server = make_server(media_dir=media, rtc_host_addresses=["127.0.0.1"], max_rtc_clients=4)
    pcm_seconds = 2 * len(read_wav("speech_pauses_16k.wav")) / 16000
    sig_url = f"{server.ws}/musetalk/v1/rtc/watcher"
    # viewer 3 offers a microphone too: receive-only means it never reaches the session
    viewers = [ClientPeer(), ClientPeer(), ClientPeer(WavTrack(read_wav("short_16k.wav")))]
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http, \
            websockets.connect(sig_url) as sig:
        r = await http.post(f"{API}/realtime/start", params={
            "session_id": "show", "avatar_id": "default", "audio_path": "speech_44k_stereo.wav"})
        assert r.status_code == 200, r.text
        assert r.json()["audio_seconds"] == pytest.approx(pcm_seconds, abs=0.01)

        for peer in viewers[:2]:  # two over POST /offer, one over the signaling socket
            offer = await peer.offer()
            r = await http.post("/offer", json={"sdp": offer.sdp, "type": "offer",
                                                "session_id": "show"})
            assert r.status_code == 200, r.text
            assert r.json()["session_id"] == "show" and r.json()["viewer"] is True
            await peer.accept(r.json()["sdp"])
        offer = await viewers[2].offer()
        await sig.send(json.dumps({"type": "offer", "sdp": offer.sdp, "session_id": "show"}))
        answer = await next_of_type(sig, "answer")
        assert answer["session_id"] == "show" and answer["viewer"] is True
        audio_m = answer["sdp"].split("m=audio")[1].split("m=")[0]
        assert "a=sendonly" in audio_m, audio_m
        await viewers[2].accept(answer["sdp"])
        await asyncio.gather(*(p.wait_connected(15) for p in viewers))

        await until(lambda: all(p.video_frames > 50 and p.audio_peak > 1000 for p in viewers), 30,
                     "every viewer to get 2 s of video and the speech audio")
        detail = (await http.get("/sessions/show")).json()
        size = (detail["video"]["width"], detail["video"]["height"])
        assert all(p.video_size == size for p in viewers), [p.video_size for p in viewers]
        assert detail["transport"] == "server" and detail["rtc"]["viewers"] == 3
        assert detail["speech_frames"] > 0
        # encoded once: the three H.264 peers read the session's one feed of packets
        assert len(detail["readers"]) == 3 and all(r["sent"] > 50 for r in detail["readers"])

        await viewers[0].close()  # a viewer leaving leaves the session running
        detail = await poll(http, "/sessions/show", lambda d: d["rtc"]["viewers"] == 2)
        assert detail["state"] in ("idle", "speaking")

        r = await http.post(f"{API}/realtime/stop", params={"session_id": "show"})
        assert r.status_code == 200, r.text
        gone = await next_of_type(sig, "disconnected")
        assert gone["session_id"] == "show"
        assert (await http.get("/sessions")).json()["count"] == 0
    for peer in viewers[1:]:
        await peer.close()


async def test_viewers_of_missing_sessions_and_beyond_the_limit_are_refused(
        make_server: MakeServer) -> None:
    server = make_server(rtc_host_addresses=["127.0.0.1"], max_rtc_clients=1)
    peers = [ClientPeer(), ClientPeer()]
    offers = [await p.offer() for p in peers]
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        body = {"sdp": offers[0].sdp, "type": "offer"}
        _error(await http.post("/offer", json={**body, "session_id": "nope"}), 404, "INVALID_SESSION")
        _error(await http.post("/offer", json=body), 400, "INVALID_MESSAGE")  # neither id
        assert (await http.get("/sessions")).json()["count"] == 0

        assert (await http.post(f"{API}/realtime/start", params={"session_id": "s1"})).status_code == 200
        r = await http.post("/offer", json={**body, "session_id": "s1"})
        assert r.status_code == 200, r.text
        r = await http.post("/offer", json={"sdp": offers[1].sdp, "type": "offer", "session_id": "s1"})
        _error(r, 429, "RATE_LIMIT_EXCEEDED")  # viewers count against MAX_RTC_CLIENTS
        assert (await http.get("/sessions/s1")).json()["rtc"]["viewers"] == 1
        assert (await http.post(f"{API}/realtime/stop", params={"session_id": "s1"})).status_code == 200
        assert not server.services.sessions.sessions
    for p in peers:
        await p.close()


async def test_a_viewers_microphone_never_reaches_the_session(make_server: MakeServer) -> None:
    server = make_server(rtc_host_addresses=["127.0.0.1"])
    speech = read_wav("short_16k.wav")
    mic = WavTrack(speech, lead_s=0.2)
    peer = ClientPeer(mic)
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        assert (await http.post(f"{API}/realtime/start", params={"session_id": "quiet"})).status_code == 200
        offer = await peer.offer()
        r = await http.post("/offer", json={"sdp": offer.sdp, "type": "offer", "session_id": "quiet"})
        assert r.status_code == 200, r.text
        await peer.accept(r.json()["sdp"])
        await peer.wait_connected()
        # counted on the session's own 25 fps clock: by then the whole clip would have
        # arrived and been lip-synced if the viewer's audio were taken (its answer is
        # sendonly, so the client does not even send it)
        frames = round(25 * (0.2 + len(speech) / 16000 + 1.0))
        await until(lambda: peer.video_frames > frames, 30, "the viewer's clip to be over")
        detail = (await http.get("/sessions/quiet")).json()
        assert detail["audio_seconds_received"] == 0 and detail["speech_frames"] == 0, detail
        assert detail["frames_sent"] == 0  # a viewer's frames are not the owner's statistics
        await peer.close()
        await poll(http, "/sessions/quiet", lambda d: d["rtc"]["viewers"] == 0)
        assert (await http.post(f"{API}/realtime/stop", params={"session_id": "quiet"})).status_code == 200
