"""Abuse of the HTTP edge (security review, issue 22), each through a real socket: image bombs,
bodies read before they are refused, spoofed X-Forwarded-For, slow-loris request heads."""

from __future__ import annotations

import json
import select
import socket
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import httpx
import pytest
import websockets
from skimage import data

from websocket_service.avatars.store import read_source
from websocket_service.config import Settings
from websocket_service.errors import InvalidMessage

from .live_server import LiveServer, MakeServer, free_port
from .wsclient import envelope, flatten

MB = 1 << 20


# ---------------------------------------------------------------- raw HTTP

def _connect(server: LiveServer, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.settings.port), timeout=timeout)


def _head(method: str, path: str, *headers: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one response (socket.timeout if none comes)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer; got {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:]))
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the answer"
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body) if body else {}


def _send_until_answered(sock: socket.socket, chunks: Callable[[], bytes | None]) -> int:
    """Send ``chunks()`` until the server answers (or they run out); the bytes sent."""
    sent, pending = 0, b""
    while True:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            return sent
        if not writable:
            raise AssertionError("the server neither answered nor read for 10 s")
        if not pending:
            nxt = chunks()
            if nxt is None:
                return sent
            pending = nxt
        try:
            n = sock.send(pending)
        except OSError:  # the server closed after answering: the answer is in the buffer
            return sent
        sent, pending = sent + n, pending[n:]


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closes the connection (socket.timeout if it does not)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------- 5: image bombs

def _png_bomb(side: int) -> bytes:
    """A valid 1-bit grey PNG of side x side pixels, all black: ~100 kB for 30000."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))
    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_image_bomb_upload_is_refused_before_it_is_decoded(server: LiveServer) -> None:
    bomb = _png_bomb(30000)
    assert len(bomb) < 200_000
    r = httpx.post(f"{server.http}/prepare_avatar/bomb",
                   files={"file": ("face.png", bomb, "image/png")}, timeout=30)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "INVALID_MESSAGE" and "MAX_IMAGE_PIXELS" in body["message"]
    assert body["details"]["max_image_pixels"] == 4096 * 4096
    assert server.services.store.running_jobs() == 0  # no job was started
    assert server.get("/avatars/bomb").status_code == 404


def _video(path: Path, side: int, frames: int = 2) -> None:
    img = cv2.resize(data.astronaut(), (side, side))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            for p in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)


def test_media_over_the_pixel_cap_is_refused_by_every_preparation_route(
        make_server: MakeServer, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    _video(media / "face.mp4", 320)
    cv2.imwrite(str(media / "still.png"), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    server = make_server(media_dir=media, max_image_pixels=300 * 300)
    with (media / "face.mp4").open("rb") as f:
        upload = httpx.post(f"{server.http}/prepare_avatar/v1",
                            files={"file": ("face.mp4", f, "video/mp4")})
    by_path = httpx.post(f"{server.http}/prepare_avatar/v2", data={"path": "still.png"})
    managed = httpx.post(f"{server.http}/api/webrtc/avatar/prepare",
                         params={"avatar_id": "v3", "video_path": "face.mp4"})
    for r, (w, h) in ((upload, (320, 320)), (by_path, (512, 512)), (managed, (320, 320))):
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "INVALID_MESSAGE"
        assert r.json()["details"] == {"width": w, "height": h, "max_image_pixels": 90000}
    assert server.services.store.running_jobs() == 0


def test_the_job_checks_the_size_again_before_decoding(tmp_path: Path) -> None:
    _video(tmp_path / "face.mp4", 320)
    with pytest.raises(InvalidMessage) as refused:
        read_source(tmp_path / "face.mp4", 10.0, 25, max_pixels=300 * 300)
    assert refused.value.details["max_image_pixels"] == 90000
    frames, still = read_source(tmp_path / "face.mp4", 10.0, 25, max_pixels=320 * 320,
                                max_frames=1)
    assert len(frames) == 1 and frames[0].shape == (320, 320, 3)  # decoding stopped at 1


# ---------------------------------------------------------------- 6: bodies

MULTIPART = "Content-Type: multipart/form-data; boundary=xyz"


def test_unauthenticated_upload_is_refused_before_its_body_is_read(
        make_server: MakeServer) -> None:
    server = make_server(auth_token="secret")
    total = 100 * MB
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/prepare_avatar/u1", MULTIPART, f"Content-Length: {total}"))
        left = [total]

        def chunks() -> bytes | None:
            if not left[0]:
                return None
            n = min(left[0], 256 * 1024)
            left[0] -= n
            return b"\x00" * n

        sent = _send_until_answered(sock, chunks)
        status, headers, body = _read_response(sock)
    assert status == 401 and body["code"] == "AUTH_FAILED"
    assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    assert sent <= 16 * MB, f"{sent} bytes were taken before the 401"  # socket buffers at most


def test_declared_terabyte_is_refused_at_once(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/prepare_avatar/u1", MULTIPART, f"Content-Length: {10**12}"))
        status, headers, body = _read_response(sock)
        assert _closed_by_server(sock)
    assert status == 413 and body["code"] == "PAYLOAD_TOO_LARGE"
    assert body["details"]["max_bytes"] == (200 << 20) + 64 * 1024  # MAX_UPLOAD_MB + framing
    assert headers["connection"] == "close"


def test_streamed_upload_is_cut_at_the_limit(make_server: MakeServer) -> None:
    server = make_server(max_upload_mb=1)
    part = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp4\"\r\n"
            b"Content-Type: video/mp4\r\n\r\n")
    pieces = [part] + [b"\x00" * (256 * 1024)] * 256  # 64 MB, never finished
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/prepare_avatar/u1", MULTIPART, "Transfer-Encoding: chunked"))

        def chunks() -> bytes | None:
            if not pieces:
                return None
            p = pieces.pop(0)
            return b"%x\r\n%s\r\n" % (len(p), p)

        sent = _send_until_answered(sock, chunks)
        status, _, body = _read_response(sock)
    assert status == 413 and body["code"] == "PAYLOAD_TOO_LARGE", body
    assert body["details"]["max_bytes"] == MB + 64 * 1024
    assert sent <= 16 * MB  # answered at the limit; socket buffers took the rest


def test_other_routes_have_a_smaller_body_limit(make_server: MakeServer) -> None:
    server = make_server(max_body_kb=4)
    r = httpx.post(f"{server.http}/offer", json={"sdp": "A" * 8192, "type": "offer"})
    assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE"
    assert r.json()["details"] == {"max_bytes": 4096}
    small = httpx.post(f"{server.http}/offer", json={"sdp": "A", "type": "offer"})
    assert small.status_code != 413


def test_a_stalled_body_is_answered_408(make_server: MakeServer) -> None:
    server = make_server(body_timeout_s=0.5)
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/offer", "Content-Type: application/json",
                           "Content-Length: 100") + b'{"sdp": ')
        status, headers, body = _read_response(sock)
    assert status == 408 and body["code"] == "INVALID_MESSAGE"
    assert body["details"] == {"body_timeout_s": 0.5} and headers["connection"] == "close"


# ---------------------------------------------------------------- 8b: X-Forwarded-For

async def _init_from(server: LiveServer, user_id: str, forwarded_for: str) -> tuple[object, dict]:
    ws = await websockets.connect(f"{server.ws}/musetalk/v1/ws/{user_id}",
                                  additional_headers={"X-Forwarded-For": forwarded_for})
    await ws.send(json.dumps(envelope("INIT", f"s-{user_id}", user_id=user_id)))
    return ws, flatten(json.loads(await ws.recv()))


async def test_forwarded_for_counts_only_from_trusted_proxies(make_server: MakeServer) -> None:
    plain = make_server(max_sessions_per_ip=1)
    first, ok = await _init_from(plain, "a", "9.9.9.9")
    second, refused = await _init_from(plain, "b", "8.8.8.8")  # still 127.0.0.1
    assert ok["type"] == "INIT_SUCCESS"
    assert refused["type"] == "ERROR" and "max_sessions_per_ip" in refused["details"], refused
    behind = make_server(max_sessions_per_ip=1, trusted_proxies=["127.0.0.1"])
    third, ok1 = await _init_from(behind, "c", "9.9.9.9")
    fourth, ok2 = await _init_from(behind, "d", "8.8.8.8")
    fifth, refused2 = await _init_from(behind, "e", "9.9.9.9")
    assert ok1["type"] == ok2["type"] == "INIT_SUCCESS"
    assert refused2["type"] == "ERROR" and "max_sessions_per_ip" in refused2["details"]
    for ws in (first, second, third, fourth, fifth):
        await ws.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- 8c: slow loris

@pytest.mark.parametrize("impl", ["httptools", "h11"])
def test_an_incomplete_request_head_is_closed(avatars_root: Path, impl: str) -> None:
    settings = Settings(avatars_dir=avatars_root, port=free_port(), header_timeout_s=0.5)
    server = LiveServer(settings, http_impl=impl).start()
    try:
        with _connect(server) as loris, _connect(server) as silent, _connect(server) as kept:
            loris.sendall(b"GET /health HTTP/1.1\r\nHost: te")
            assert server.get("/health").status_code == 200  # others are served meanwhile
            kept.sendall(_head("GET", "/health"))
            assert _read_response(kept)[0] == 200
            kept.sendall(b"GET /health HTTP/1.1\r\n")  # a second head, never finished
            assert _closed_by_server(loris)
            assert _closed_by_server(silent)
            assert _closed_by_server(kept)
    finally:
        server.stop()
