"""A client that stops reading must not grow server memory; its session sheds frames."""

from __future__ import annotations

import socket
import uuid

import pytest

from .support import rss_mb, wait_until
from .wsclient import non_reading_socket


def open_non_reading_client(port: int, user_id: str) -> socket.socket:
    # big all-keyframe frames (~100 KB each), so kernel socket buffers fill within seconds
    return non_reading_socket(port, f"/musetalk/v1/ws/{user_id}", {
        "type": "INIT", "session_id": str(uuid.uuid4()), "data": {
            "user_id": user_id, "video_config": {"resolution": "1024x1024", "gop_seconds": 0.04,
                                                 "bitrate": 20_000_000}}})


@pytest.mark.parametrize("clients", [2])
def test_non_reading_clients_keep_memory_bounded(make_server, clients):
    server = make_server(send_queue_frames=8)
    socks = [open_non_reading_client(server.settings.port, f"slow{i}") for i in range(clients)]

    def emitted_by_all(n: int) -> bool:
        info = server.get("/sessions").json()
        return info["count"] == clients and all(s["frames_emitted"] >= n for s in info["sessions"])

    wait_until(lambda: emitted_by_all(50), 30, "50 frames emitted to each client")
    base = rss_mb()
    # 150 more frames each: 15 MB encoded, 450 MB raw, if nothing were dropped; the pacer never
    # waits for the reader, so they are emitted however little the clients read
    wait_until(lambda: emitted_by_all(200), 60, "200 frames emitted to each client")
    growth = rss_mb() - base
    info = server.get("/sessions").json()
    assert info["count"] == clients
    for s in info["sessions"]:
        assert s["frames_emitted"] >= 180, s  # the pacer never waits for the reader
        assert s["dropped_frames"] > 100, {k: s[k] for k in ("frames_emitted", "frames_sent", "dropped_frames", "bytes_sent")}  # the slow reader's frames are shed
        assert s["frames_sent"] < s["frames_emitted"] - 100
    assert growth < 40, f"server memory grew {growth:.1f} MB"
    for s in socks:
        s.close()
    wait_until(lambda: server.get("/sessions").json()["count"] == 0, 10, "the sessions to end")
