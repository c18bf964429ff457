"""REST: health, sessions, avatars and preparation jobs, and the checked-in OpenAPI file."""

from __future__ import annotations

import gc

import httpx
import yaml

from .conftest import ROOT
from .support import face_photo, face_video, wait_job
from .wsclient import Client


def test_openapi_yaml_matches_the_app(server):
    checked_in = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert checked_in == server.app.openapi(), "run: python -m scripts.export_openapi"
    served = yaml.safe_load(server.get("/openapi.yaml").text)
    assert served == checked_in


def test_health_and_landing_page(server):
    h = server.get("/health").json()
    assert h["status"] == "ok" and h["engine"] == "geometric" and h["model_loaded"]
    assert h["device"] == "cpu" and h["version"]
    assert h["sessions"] == 0 and h["max_sessions"] == server.settings.max_sessions
    assert h["ready"] is True and h["replicas"] is None  # one process: no replicas to wait for
    later = server.get("/health").json()
    assert later["uptime_s"] >= h["uptime_s"] > 0  # counts from start-up, forwards
    page = server.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert server.get("/docs").status_code == 200


def test_start_up_objects_stay_out_of_the_collectors_full_passes_while_it_serves(make_server):
    """The app freezes what start-up made (gc.freeze: a full collection walked ~250k objects
    with the GIL held, a 100 ms stall of every session) and gives it back at shutdown."""
    server = make_server()
    assert server.get("/health").json()["ready"] is True
    assert gc.get_freeze_count() > 10_000
    server.stop()
    assert gc.get_freeze_count() == 0


async def test_sessions_report_live_counters(server):
    client, _ = await Client.connect(server.ws)
    client.decode = False
    await client.recv_frames(30, timeout=20)
    info = server.get("/sessions").json()
    assert info["count"] == 1
    s = info["sessions"][0]
    assert s["session_id"] == client.session_id and s["state"] == "idle"
    assert s["fps"] > 0  # its value measures the machine (bench_sessions reports it)
    assert s["frames_sent"] >= len(client.frames) >= 30 and s["dropped_frames"] == 0
    for key in ("audio_seconds_received", "latency_ms", "skipped_frames", "underruns"):
        assert key in s
    assert server.get(f"/sessions/{client.session_id}").json()["session_id"] == client.session_id
    missing = server.get("/sessions/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "MODEL_NOT_FOUND"
    await client.close()


async def test_prepare_avatar_from_upload_then_stream_it(server, tmp_path):
    video = tmp_path / "face.mp4"
    face_video(video, 20)
    with video.open("rb") as f:
        r = httpx.post(f"{server.http}/prepare_avatar/alice", files={"file": ("face.mp4", f, "video/mp4")})
    assert r.status_code == 202, r.text
    job = wait_job(server, r.json()["status_url"])
    assert job["status"] == "done" and job["progress"] == 1.0
    meta = server.get("/avatars/alice").json()
    assert meta["source"] == "video" and meta["clips"]["idle"]["frames"] == 20
    assert meta["report"]["face_found_in"] >= 1
    assert "alice" in [a["avatar_id"] for a in server.get("/avatars").json()["avatars"]]
    client, reply = await Client.connect(server.ws, "alice", video_config={"avatar_id": "alice"})
    assert reply["type"] == "INIT_SUCCESS" and reply["avatar"] == "alice"
    await client.recv_frames(10)
    assert len(client.images) >= 10
    await client.close()


def test_prepare_avatar_from_media_root_and_refuse_escapes(make_server, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    face_photo(media / "still.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    server = make_server(media_root=media)
    r = httpx.post(f"{server.http}/prepare_avatar/bob", data={"path": "still.png"})
    assert r.status_code == 202
    assert wait_job(server, r.json()["status_url"])["status"] == "done"
    assert server.get("/avatars/bob").json()["source"] == "still"
    for bad in ("../secret.png", "/etc/passwd", "nope.png"):
        r = httpx.post(f"{server.http}/prepare_avatar/bob", data={"path": bad})
        assert r.status_code in (400, 404) and r.json()["code"] in ("INVALID_MESSAGE", "MODEL_NOT_FOUND")
    r = httpx.post(f"{server.http}/prepare_avatar/bob")
    assert r.status_code == 400 and r.json()["code"] == "INVALID_MESSAGE"


def test_prepare_rejects_bad_files_clearly(server):
    r = httpx.post(f"{server.http}/prepare_avatar/carol", files={"file": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 400 and "unsupported" in r.json()["message"]
    r = httpx.post(f"{server.http}/prepare_avatar/carol", files={"file": ("x.mp4", b"garbage", "video/mp4")})
    job = wait_job(server, r.json()["status_url"])
    assert job["status"] == "failed" and job["error"]["code"] == "PROCESSING_ERROR"
    r = httpx.post(f"{server.http}/prepare_avatar/bad%20id", files={"file": ("x.png", b"x", "image/png")})
    assert r.status_code == 400
    assert server.get("/avatars/ghost").status_code == 404
    assert server.get("/jobs/nope").json()["code"] == "MODEL_NOT_FOUND"
