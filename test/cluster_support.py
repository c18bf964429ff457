"""What the Ray Serve cluster tests share (``test_cluster.py``, ``test_cluster_nodes.py``): the
operator's and users' tokens, a ``Cluster``'s addresses, a ``Peer`` of the enveloped protocol
that records every message and decodes every frame, and checks on what peers received."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import av
import httpx
import websockets

from .support import jwt_token
from .support import poll as poll_any

MAX_SESSIONS = 2
CHUNK = 1280  # 40 ms of 16 kHz s16le: one frame's audio
# users connect with JWTs of their own; the test's REST calls act as the operator
SECRET = "a-jwt-secret-of-at-least-32-bytes!!"
OPERATOR = {"Authorization": "Bearer operator-token"}
poll = functools.partial(poll_any, timeout=30.0, headers=OPERATOR)  # as the operator, unless told


def bearer(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {user_token(user_id)}"}


def user_token(user_id: str) -> str:
    return jwt_token(SECRET, user_id, 3600)


class Cluster:
    def __init__(self, port: int) -> None:
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"

    def get(self, path: str) -> Any:
        r = httpx.get(self.http + path, headers=OPERATOR, timeout=30)
        r.raise_for_status()
        return r.json() if r.headers["content-type"].startswith("application/json") else r.text




def envelope(type_: str, session_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "session_id": session_id, "data": data}


def opened(msg: dict[str, Any]) -> dict[str, Any]:
    return msg


class Peer:
    """A client of the enveloped protocol: records every message, decodes every frame."""

    def __init__(self, ws: Any, user_id: str) -> None:
        self.ws = ws
        self.user_id = user_id
        self.session_id = str(uuid.uuid4())
        self.frames: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.decoder = av.CodecContext.create("h264", "r")
        self.changed = asyncio.Condition()
        self.reader: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.closed = False

    @classmethod
    async def open(cls, base: str, user_id: str, view: tuple[str, str] | None = None,
                   by_header: bool = False) -> Peer:
        """A session of ``user_id``'s; ``view``: (session id, view token) to watch instead,
        the session named in the URL too (a browser's socket can carry no header), or in
        Serve's session header (``by_header``: what another client may send)."""
        query = f"?session_id={view[0]}" if view and not by_header else ""
        headers = {"x-session-id": view[0]} if view and by_header else None
        ws = await websockets.connect(f"{base}/musetalk/v1/ws/{user_id}{query}", max_size=2**24,
                                      additional_headers=headers)
        peer = cls(ws, user_id)
        if view:
            peer.session_id = view[0]
            await peer.send("INIT", user_id=user_id, auth_token=view[1], viewer=True)
        else:
            await peer.send("INIT", user_id=user_id, auth_token=user_token(user_id),
                            video_config={"resolution": "512x512", "fps": 25})
        peer.reader = asyncio.create_task(peer._read())
        return peer

    async def send(self, type_: str, **data: Any) -> None:
        await self.ws.send(json.dumps(envelope(type_, self.session_id, data)))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = opened(json.loads(raw))
                assert msg.get("session_id") in (self.session_id, None), msg
                if msg["type"] == "VIDEO_FRAME":
                    frame = msg["data"]
                    out = self.decoder.decode(av.Packet(base64.b64decode(frame["frame_data"])))
                    assert len(out) == 1, f"frame {frame['frame_index']} did not decode"
                    self.frames.append(frame)
                else:
                    self.events.append(msg)
                async with self.changed:
                    self.changed.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed = True
            async with self.changed:
                self.changed.notify_all()

    async def until(self, pred: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Wait for what has arrived to satisfy ``pred`` (or for the socket to close); return
        ``pred()``."""
        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(lambda: pred() or self.closed),
                                       timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.user_id}: waited {timeout} s; {len(self.frames)} frames, utterances of "
                f"{[len(u) for u in self.utterances()]} frames, events "
                f"{[e['type'] for e in self.events]}") from None
        return pred()

    def event(self, type_: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["type"] == type_), None)

    async def speak(self, pcm: bytes) -> int:
        """Send speech as 40 ms chunks at the pace of a live source; the number of chunks."""
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(pcm), CHUNK)):
            piece = pcm[i:i + CHUNK]
            await self.send("GENERATE", audio_chunk={
                "format": "pcm_s16le", "sample_rate": 16000, "channels": 1,
                "duration_ms": len(piece) / 32, "data": base64.b64encode(piece).decode()})
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.04 - time.monotonic()))
        await self.send("END_OF_SPEECH")
        return -(-len(pcm) // CHUNK)

    def utterances(self) -> list[list[int]]:
        """Each utterance's frame numbers as they arrived."""
        out: dict[str, list[int]] = {}
        for f in self.frames:
            if f.get("utterance_frame") is not None:
                out.setdefault(f["utterance_id"], []).append(f["utterance_frame"])
        return list(out.values())

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader


def assert_on_timeline(frames: list[dict[str, Any]], utterance_ms: float) -> None:
    """Frame n of the 25 fps timeline is stamped n * 40 ms; a speech frame instead carries the
    audio time of its own 40 ms chunk (utterances of ``utterance_ms`` each, one after another)."""
    indices = [f["frame_index"] for f in frames]
    assert indices == sorted(set(indices))
    order: list[str] = []
    for f in frames:
        if f.get("utterance_frame") is None:
            assert f["frame_timestamp"] == 40 * f["frame_index"], f["frame_index"]
            continue
        if f["utterance_id"] not in order:
            order.append(f["utterance_id"])
        start = order.index(f["utterance_id"]) * utterance_ms
        assert f["frame_timestamp"] == round(start + 40 * f["utterance_frame"]), f["frame_index"]


async def open_session(cluster: Cluster, user_id: str) -> tuple[Peer, dict[str, Any]]:
    peer = await Peer.open(cluster.ws, user_id)
    reply = await peer.until(lambda: peer.events[0] if peer.events else None, timeout=30)
    return peer, reply


async def no_sessions_left(cluster: Cluster) -> None:
    """The next test starts from an empty cluster (closing is asynchronous on the replicas)."""
    async with httpx.AsyncClient(base_url=cluster.http, timeout=30) as http:
        await poll(http, "/sessions", lambda b: b["count"] == 0)


def replica(reply: dict[str, Any]) -> str:
    return reply["data"]["replica_id"]


def same_frames(owner: Peer, viewers: list[Peer]) -> int:
    """How many frame indices every reader got; asserts they carry the same bytes."""
    by_index = [{f["frame_index"]: f["frame_data"] for f in p.frames} for p in (owner, *viewers)]
    common = set.intersection(*(set(d) for d in by_index))
    assert all(len({d[i] for d in by_index}) == 1 for i in common)
    return len(common)
