"""A client that stops reading must not grow server memory; its session sheds frames."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
import uuid

import pytest


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def ws_text_frame(text: str) -> bytes:
    """A masked client text frame (RFC 6455 section 5.2)."""
    payload = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def open_non_reading_client(port: int, user_id: str) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /musetalk/v1/ws/{user_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    # big all-keyframe frames (~100 KB each), so kernel socket buffers fill within seconds
    s.sendall(ws_text_frame(json.dumps({
        "type": "INIT", "session_id": str(uuid.uuid4()), "data": {
            "user_id": user_id, "video_config": {"resolution": "1024x1024", "gop_seconds": 0.04,
                                                 "bitrate": 20_000_000}}})))
    return s  # and never read again


@pytest.mark.parametrize("clients", [2])
def test_non_reading_clients_keep_memory_bounded(make_server, clients):
    server = make_server(send_queue_frames=8)
    socks = [open_non_reading_client(server.settings.port, f"slow{i}") for i in range(clients)]
    time.sleep(2.0)
    base = rss_mb()
    time.sleep(6.0)  # 150 frames each: 15 MB encoded, 450 MB raw, if nothing were dropped
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
    deadline = time.monotonic() + 10
    while server.get("/sessions").json()["count"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.get("/sessions").json()["count"] == 0
