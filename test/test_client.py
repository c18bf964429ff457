"""Command-line test client: stream a WAV to the avatar service, check and record the result.

    python test/test_client.py --server ws://localhost:8000 --user-id u1 \
        --audio-file fixtures/speech_pauses_16k.wav --out result.mp4

Importable: ``main(argv)`` returns the exit code; ``run(parse_args(argv))`` returns a ``Summary``
and the ``StreamClient`` with every frame and event.
Nothing runs on import (pytest collects this file; it defines no tests).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

RATE = 16_000
CHUNK = 640  # samples per 40 ms chunk = one video frame
FRAME_MS = 40.0

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_SERVER_ERROR, EXIT_CHECK = 0, 2, 3, 4, 5
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 8.0


class ClientError(Exception):
    """A failure with a readable message and an exit code; ``lost``: the connection went (or
    never came), which ``--reconnect`` retries."""

    def __init__(self, message: str, code: int = EXIT_SERVER_ERROR, lost: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.lost = lost


# ---------------------------------------------------------------------------- audio input

def load_wav(path: str | Path) -> tuple[np.ndarray, str | None]:
    """16 kHz mono int16 samples of ``path``, plus a note if it had to be converted."""
    p = Path(path)
    if not p.is_file():
        raise ClientError(f"audio file not found: {p}", EXIT_USAGE)
    try:
        with av.open(str(p)) as container:
            if not container.streams.audio:
                raise ClientError(f"{p} has no audio stream", EXIT_USAGE)
            stream = container.streams.audio[0]
            ctx = stream.codec_context
            src = f"{ctx.name} {ctx.sample_rate} Hz {ctx.layout.name} {ctx.format.name}"
            native = ctx.name == "pcm_s16le" and ctx.sample_rate == RATE and ctx.layout.nb_channels == 1
            resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
            parts = []
            for frame in [*container.decode(stream), None]:
                parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    except av.FFmpegError as exc:
        raise ClientError(f"cannot read {p} as audio: {exc}", EXIT_USAGE) from None
    pcm = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
    if len(pcm) == 0:
        raise ClientError(f"{p} contains no audio samples", EXIT_USAGE)
    note = None if native else f"converted {src} to 16000 Hz mono s16le"
    return pcm, note


def chunk_messages(pcm: np.ndarray, session_id: str) -> list[str]:
    """The GENERATE messages for ``pcm``, one per 40 ms (the last one may be shorter)."""
    out = []
    for start in range(0, len(pcm), CHUNK):
        part = pcm[start:start + CHUNK]
        out.append(envelope("GENERATE", session_id, audio_chunk={
            "data": base64.b64encode(part.astype("<i2").tobytes()).decode("ascii"),
            "format": "pcm_s16le", "sample_rate": RATE, "channels": 1,
            "duration_ms": len(part) / 16.0}))
    return out


def envelope(type_: str, session_id: str, **data: Any) -> str:
    """A protocol message: ``{"type", "session_id", "data"}``."""
    return json.dumps({"type": type_, "session_id": session_id, "data": data})


def unwrap(raw: str | bytes) -> dict[str, Any]:
    """A server message as ``{"type", "session_id", **data}``."""
    msg = json.loads(raw)
    return {"type": msg.get("type"), "session_id": msg.get("session_id"), **(msg.get("data") or {})}


# ---------------------------------------------------------------------------- results

@dataclass
class Received:
    frame_index: int
    timestamp_ms: int
    state: str
    keyframe: bool
    t: float  # monotonic arrival
    data: bytes
    utterance_id: int | None = None
    utterance_frame: int | None = None


@dataclass
class Summary:
    frames_received: int = 0
    frames_decoded: int = 0
    decode_errors: int = 0
    fps: float | None = None
    states: dict[str, int] = field(default_factory=dict)
    speaking_frames: int = 0
    expected_speaking_frames: int = 0
    stall_frames: int = 0  # speaking state without speech (server underrun)
    index_gaps: int = 0
    server: dict[str, Any] | None = None
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    time_to_first_frame_ms: float | None = None
    utterances: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    video_config: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    replica_id: str | None = None  # the serving replica when scaled out
    reconnects: int = 0  # sessions opened again after a lost connection (--reconnect)

    def text(self) -> str:
        srv, lat = self.server, self.latency_ms
        server = ("server (/sessions): not reachable" if not srv else
                  f"server (/sessions): dropped {srv.get('dropped_frames')}, skipped "
                  f"{srv.get('skipped_frames')}, underruns {srv.get('underruns')}, fps {srv.get('fps')}, "
                  f"latency p50 {srv['latency_ms'].get('p50')} ms, p95 {srv['latency_ms'].get('p95')} ms")
        lines = [
            f"frames received: {self.frames_received} (decoded {self.frames_decoded}, "
            f"decode errors {self.decode_errors}), fps measured {_fmt(self.fps, 2)}",
            f"states seen: {', '.join(f'{k}={v}' for k, v in self.states.items())}",
            f"speaking frames: {self.speaking_frames} / expected {self.expected_speaking_frames}"
            f" (stalled speaking frames {self.stall_frames})",
            f"frame_index gaps: {self.index_gaps} missing", server,
            f"latency chunk sent -> frame received: p50 {_fmt(lat.get('p50'))} ms, "
            f"p95 {_fmt(lat.get('p95'))} ms ({lat.get('samples', 0)} samples)",
            f"time to first frame: {_fmt(self.time_to_first_frame_ms)} ms",
        ]
        if self.errors:
            lines.append(f"server errors: {[e.get('code') for e in self.errors]}")
        if self.out:
            lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------- the session

class StreamClient:
    """One session: send INIT, stream audio in real time, collect every frame and event."""

    def __init__(self, cfg: argparse.Namespace, pcm: np.ndarray) -> None:
        self.cfg = cfg
        self.pcm = pcm
        self.session_id = str(uuid.uuid4())
        self.frames: list[Received] = []
        self.events: list[dict[str, Any]] = []
        self.send_times: list[float] = []
        self.decoder = av.CodecContext.create("h264", "r")
        self.decoded = 0
        self.decode_errors = 0
        self._ended: dict[int, int] = {}  # utterance_id -> frames, from SPEECH_ENDED
        self._offset: dict[int, int] = {}  # utterance_id -> global index of its frame 0
        self._speech_done = asyncio.Event()
        self._close_ack = asyncio.Event()
        self._lost = asyncio.Event()  # the server's side of the socket is gone
        self._last_progress = 0.0
        self._speaking = 0
        self.t_init = 0.0
        self.video_config: dict[str, Any] = {}
        self.replica_id: str | None = None

    # -- receiving
    def _on_frame(self, msg: dict[str, Any], now: float) -> None:
        data = base64.b64decode(msg["frame_data"])
        state = "action" if msg["type"] == "ACTION_FRAME" else msg.get("state", "?")
        # the session clock (frame_timestamp of a speech frame is its audio's time instead)
        rec = Received(msg["frame_index"], msg["frame_index"] * FRAME_MS, state,
                       bool(msg.get("keyframe")),
                       now, data, msg.get("utterance_id"), msg.get("utterance_frame"))
        self._speaking += rec.utterance_frame is not None
        try:
            self.decoded += len(self.decoder.decode(av.Packet(data)))
        except av.FFmpegError:
            self.decode_errors += 1
        if rec.utterance_id is not None and rec.utterance_id not in self._offset:
            self._offset[rec.utterance_id] = sum(self._ended.values())
        self.frames.append(rec)
        self._progress(now)

    def _progress(self, now: float, final: bool = False) -> None:
        if self.cfg.quiet or (now - self._last_progress < 0.25 and not final):
            return
        self._last_progress = now
        f = self.frames[-1] if self.frames else None
        sys.stderr.write(f"\r  frames {len(self.frames):5d}  state {f.state if f else '-':8s}  "
                         f"audio sent {len(self.send_times):4d}/{math.ceil(len(self.pcm) / CHUNK)}  "
                         f"speaking frames {self._speaking:4d}" + ("\n" if final else ""))
        sys.stderr.flush()

    async def _receive(self, ws: Any) -> None:
        try:
            await self._receive_all(ws)
        finally:
            self._lost.set()

    async def _receive_all(self, ws: Any) -> None:
        async for raw in ws:
            now = time.monotonic()
            msg = unwrap(raw)
            kind = msg.get("type")
            if kind in ("VIDEO_FRAME", "ACTION_FRAME"):
                self._on_frame(msg, now)
                continue
            self.events.append({**msg, "_t": now})
            if kind == "SPEECH_ENDED":
                self._ended[msg["utterance_id"]] = msg["frames"]
                if sum(self._ended.values()) >= math.ceil(len(self.pcm) / CHUNK) or msg.get("interrupted"):
                    self._speech_done.set()
            elif kind == "CLOSE_ACK":
                self._close_ack.set()
            elif kind == "ERROR" and not self.cfg.quiet:
                sys.stderr.write(f"\nserver ERROR {msg.get('code')}: {msg.get('message')}\n")

    # -- the run
    async def run(self) -> Summary:
        import websockets  # noqa: PLC0415 - only the CLI needs it

        url = f"{self.cfg.server.rstrip('/')}/musetalk/v1/ws/{self.cfg.user_id}"
        try:
            ws = await asyncio.wait_for(websockets.connect(url, max_size=16 << 20), 10)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise ClientError(f"cannot connect to {url}: {exc}", EXIT_UNREACHABLE,
                              lost=True) from None
        async with ws:
            vc: dict[str, Any] = {"fps": 25}
            if self.cfg.avatar_id:
                vc["avatar_id"] = self.cfg.avatar_id
            if self.cfg.width and self.cfg.height:
                vc["resolution"] = f"{self.cfg.width}x{self.cfg.height}"
            self.t_init = time.monotonic()
            await ws.send(envelope("INIT", self.session_id, user_id=self.cfg.user_id,
                                   video_config=vc))
            try:
                reply = unwrap(await asyncio.wait_for(ws.recv(), 15))
            except (TimeoutError, websockets.exceptions.ConnectionClosed) as exc:
                raise ClientError(f"no INIT_SUCCESS from the server: {exc!r}",
                                  lost=True) from None
            if reply.get("type") != "INIT_SUCCESS":
                raise ClientError(f"INIT failed: {reply.get('code')}: {reply.get('message')} "
                                  f"{reply.get('details') or ''}",
                                  lost=reply.get("code") == "RATE_LIMIT_EXCEEDED")
            self.video_config = reply.get("video_config", {})
            self.replica_id = reply.get("replica_id")
            receiver = asyncio.create_task(self._receive(ws))
            try:
                await self._stream(ws)
                server = await fetch_session(self.cfg.server, self.session_id)
                await ws.send(envelope("CLOSE", self.session_id))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._close_ack.wait(), 3)
            except websockets.exceptions.ConnectionClosed as exc:
                raise ClientError(f"the server closed the connection: {exc}", lost=True) from None
            finally:
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)
        self._progress(time.monotonic(), final=True)
        return self.summary(server)

    async def _stream(self, ws: Any) -> None:
        await asyncio.sleep(self.cfg.lead_s)
        if self.cfg.action:
            await ws.send(envelope("ACTION", self.session_id, action_type=self.cfg.action))
        messages = chunk_messages(self.pcm, self.session_id)
        t0 = time.monotonic()
        for k, text in enumerate(messages):  # absolute deadlines: no drift
            delay = t0 + k * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.send_times.append(time.monotonic())
            await ws.send(text)
        await ws.send(envelope("END_OF_SPEECH", self.session_id))
        done, lost = (asyncio.create_task(e.wait()) for e in (self._speech_done, self._lost))
        await asyncio.wait({done, lost}, timeout=10 + len(self.pcm) / RATE,
                           return_when=asyncio.FIRST_COMPLETED)
        for task in (done, lost):
            task.cancel()
        if self._lost.is_set():
            raise ClientError("the server closed the connection", lost=True)
        if not self._speech_done.is_set() and not self.cfg.quiet:
            sys.stderr.write("\nwarning: no SPEECH_ENDED for all the audio\n")
        await asyncio.sleep(self.cfg.tail_s)

    # -- results
    def global_speech_index(self, r: Received) -> int | None:
        if r.utterance_frame is None or r.utterance_id is None:
            return None
        return self._offset.get(r.utterance_id, 0) + r.utterance_frame

    def summary(self, server: dict[str, Any] | None) -> Summary:
        fr = self.frames
        s = Summary(frames_received=len(fr), frames_decoded=self.decoded,
                    decode_errors=self.decode_errors, server=server,
                    expected_speaking_frames=math.ceil(len(self.pcm) / CHUNK),
                    video_config=self.video_config)
        if len(fr) >= 2 and fr[-1].t > fr[0].t:
            s.fps = (len(fr) - 1) / (fr[-1].t - fr[0].t)
        for r in fr:
            s.states[r.state] = s.states.get(r.state, 0) + 1
        s.speaking_frames = self._speaking
        s.stall_frames = sum(1 for r in fr if r.state == "speaking" and r.utterance_frame is None)
        s.index_gaps = sum(max(0, b.frame_index - a.frame_index - 1)
                           for a, b in zip(fr, fr[1:], strict=False))
        lat = []
        for r in fr:
            g = self.global_speech_index(r)
            if g is not None and g < len(self.send_times):
                lat.append((r.t - self.send_times[g]) * 1000)
        s.latency_ms = {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "samples": len(lat)}
        if fr:
            s.time_to_first_frame_ms = (fr[0].t - self.t_init) * 1000
        s.utterances = [{k: v for k, v in e.items() if k != "_t"}
                        for e in self.events if e.get("type") == "SPEECH_ENDED"]
        s.errors = [e for e in self.events if e.get("type") == "ERROR"]
        s.replica_id = self.replica_id
        return s


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def fetch_session(ws_url: str, session_id: str) -> dict[str, Any] | None:
    """This session's entry in GET /sessions, or None if the REST API is not reachable."""
    import httpx  # noqa: PLC0415

    http = ws_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1).rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=3) as client:
            body = (await client.get(f"{http}/sessions")).json()
    except (httpx.HTTPError, ValueError):
        return None
    for item in body.get("sessions", []):
        if item.get("session_id") == session_id:
            return item
    return None


# ---------------------------------------------------------------------------- MP4 output

def write_mp4(client: StreamClient, path: str | Path) -> None:
    """Re-encode the received frames (H.264, 25 fps) and mux the speech audio (AAC) in sync.

    A frame's position is its timestamp_ms relative to the first frame received; the audio of
    utterance frame n plays at that frame's timestamp, silence elsewhere.
    """
    frames = client.frames
    if not frames:
        raise ClientError("no frames received; nothing to write", EXIT_CHECK)
    ts0 = frames[0].timestamp_ms
    total_ms = frames[-1].timestamp_ms - ts0 + FRAME_MS
    track = np.zeros(int(total_ms * RATE / 1000) + CHUNK, np.int16)
    for r in frames:
        g = client.global_speech_index(r)
        if g is None:
            continue
        piece = client.pcm[g * CHUNK:(g + 1) * CHUNK]
        at = int(round((r.timestamp_ms - ts0) * RATE / 1000))
        track[at:at + len(piece)] = piece

    decoder = av.CodecContext.create("h264", "r")
    with av.open(str(path), "w", format="mp4") as out:
        vs = aus = None
        last_pts = -1
        for r in frames:
            try:
                decoded = decoder.decode(av.Packet(r.data))
            except av.FFmpegError:
                continue
            for img in decoded:
                if vs is None:  # streams are added once the picture size is known
                    vs = out.add_stream("libx264", rate=25)
                    vs.width, vs.height, vs.pix_fmt = img.width, img.height, "yuv420p"
                    vs.codec_context.time_base = Fraction(1, 25)
                    vs.options = {"preset": "veryfast", "crf": "23"}
                    aus = out.add_stream("aac", rate=RATE, layout="mono")
                pts = int(round((r.timestamp_ms - ts0) / FRAME_MS))
                if pts <= last_pts:
                    continue
                last_pts = pts
                vf = img.reformat(format="yuv420p")
                vf.pts, vf.time_base = pts, Fraction(1, 25)
                out.mux(vs.encode(vf))
        if vs is None or aus is None:
            raise ClientError("no received frame could be decoded", EXIT_CHECK)
        out.mux(vs.encode(None))
        step = 1024
        for start in range(0, len(track), step):
            part = track[start:start + step].astype(np.float32) / 32768.0
            af = av.AudioFrame.from_ndarray(part.reshape(1, -1), format="fltp", layout="mono")
            af.sample_rate, af.pts, af.time_base = RATE, start, Fraction(1, RATE)
            out.mux(aus.encode(af))
        out.mux(aus.encode(None))


# ---------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="ws://localhost:8000", help="ws:// or wss:// base URL")
    ap.add_argument("--user-id", default="cli-user")
    ap.add_argument("--audio-file", required=True, help="WAV (16 kHz mono s16le; others are resampled)")
    ap.add_argument("--out", help="write an MP4 with the received video and the audio")
    ap.add_argument("--avatar-id")
    ap.add_argument("--action", help="send ACTION with this name before the speech")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--lead-s", type=float, default=0.5, help="idle time before the speech")
    ap.add_argument("--tail-s", type=float, default=1.0, help="idle time kept after SPEECH_ENDED")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--reconnect", type=int, default=0, metavar="N",
                    help="a lost connection (e.g. its replica died) opens a new session and "
                         "streams the audio again, up to N times, after 0.5 s, doubling")
    a = ap.parse_args(argv)
    if not a.server.startswith(("ws://", "wss://")):
        ap.error("--server must start with ws:// or wss://")
    if any(v is not None and (v < 64 or v > 1920 or v % 2) for v in (a.width, a.height)):
        ap.error("--width and --height must be even numbers from 64 to 1920")
    if (a.width is None) != (a.height is None):
        ap.error("give --width and --height together")
    if a.lead_s < 0 or a.tail_s < 0:
        ap.error("--lead-s and --tail-s must be >= 0")
    return a


async def run(cfg: argparse.Namespace) -> tuple[Summary, StreamClient]:
    pcm, note = load_wav(cfg.audio_file)
    if note and not cfg.quiet:
        sys.stderr.write(f"note: {note}\n")
    delay, reconnects = RECONNECT_FIRST_S, 0
    while True:
        client = StreamClient(cfg, pcm)
        try:
            summary = await client.run()
            break
        except ClientError as exc:
            if not exc.lost or reconnects >= cfg.reconnect:
                raise
            sys.stderr.write(f"\nconnection lost ({exc}); reconnecting in {delay:.1f} s\n")
            await asyncio.sleep(delay)
            delay, reconnects = min(delay * 2, RECONNECT_MAX_S), reconnects + 1
    summary.reconnects = reconnects
    if reconnects:
        sys.stderr.write(f"reconnected: session {client.session_id} on replica "
                         f"{client.replica_id or '-'}\n")
    if cfg.out:
        await asyncio.to_thread(write_mp4, client, cfg.out)
        summary.out = str(cfg.out)
    return summary, client


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        summary, _ = asyncio.run(run(cfg))
    except ClientError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    if cfg.json:
        print(json.dumps(summary.__dict__, indent=2, default=str))
    else:
        print(summary.text())
    ok = summary.frames_received > 0 and summary.decode_errors == 0
    return EXIT_OK if ok else EXIT_CHECK


if __name__ == "__main__":
    sys.exit(main())
