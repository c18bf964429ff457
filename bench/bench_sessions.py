"""Load benchmark: how many concurrent sessions hold 25 fps on this machine, and at what cost.

    python bench/bench_sessions.py            # full ramp, ~3-6 min
    python bench/bench_sessions.py --quick    # ~1 min
    python -m bench.burst --levels 256,512   # cold bursts: bench/burst.py

It starts the server itself in a subprocess (so its CPU can be read from /proc/<pid>/stat apart
from the clients'), then for each level N runs N WebSocket clients in this one asyncio process:
idle sessions first, then speaking sessions (each streams fixtures/speech_pauses_16k.wav in
real time, looping, one utterance per pass). A level holds if the median client fps is at least
24.5, no session skipped more than 1% of its frames and, speaking, at most 2% of the speech
frames were underruns (the last picture repeated because the next was not rendered in time).
The clients parse every message but decode only a sample of frames (to prove they are valid
H.264), to keep their CPU low; they still share the machine's cores with the server, so their
CPU is reported too.

Writes a markdown section to stdout and to docs/bench_sessions.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import Any

import av
import httpx
import numpy as np
import websockets

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "fixtures" / "speech_pauses_16k.wav"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FPS = 25
HOLD_FPS = 24.5
HOLD_SKIP = 0.01
HOLD_UNDERRUNS = 0.02  # speaking: at most this share of the speech frames repeat a picture
RETRY_OTHER = 0.25  # a failing level is run again once if other processes used more CPU than this
SAMPLE_DECODE = 25  # frames decoded per level (client 0), from its first keyframe


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (e.g. the server's encoder workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += proc_cpu_s(p)
        except OSError:  # exited meanwhile
            continue
        todo.extend(children.get(p, []))
    return total


def machine_busy_s() -> float:
    """CPU seconds spent busy by the whole machine (all cores, all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK  # minus idle and iowait


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return median(vals) if vals else None


def load_chunks() -> list[bytes]:
    with av.open(str(SPEECH)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]).astype("<i2")
    return [pcm[i:i + 640].tobytes() for i in range(0, len(pcm), 640)]


# ---------------------------------------------------------------------------- server

class Server:
    def __init__(self, port: int, log_path: Path, avatars: Path, max_sessions: int) -> None:
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "AVATARS_DIR": str(avatars),
               "MAX_SESSIONS": str(max_sessions), "LOG_LEVEL": "warning"}
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "run_server.py")], cwd=ROOT,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"

    @classmethod
    def on_free_port(cls, prefix: str, max_sessions: int) -> Server:
        """A server on a free loopback port, with its log and avatars in a new temp folder."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tmp = Path(tempfile.mkdtemp(prefix=prefix))
        return cls(port, tmp / "server.log", tmp / "avatars", max_sessions=max_sessions)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.http}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)  # with ENCODER_PROCESSES the encoding runs in children

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def log_problems(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln for ln in lines if any(w in ln for w in ("ERROR", "Traceback", "WARNING", "Exception"))]


async def sessions(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    body = (await http.get("/sessions")).json()
    return {s["session_id"]: s for s in body["sessions"]}


# ---------------------------------------------------------------------------- clients

def _idle_frame_index(raw: str | bytes) -> int | None:
    """frame_index of a VIDEO_FRAME that is not speech, read from the text; None otherwise."""
    if not isinstance(raw, str) or not raw.startswith('{"type": "VIDEO_FRAME"') \
            or '"utterance_id"' in raw[-160:]:
        return None
    at = raw.rfind('"frame_index":')
    end = raw.find(",", at)
    return int(raw[at + 14:end]) if at > 0 and end > 0 else None


@dataclass
class Client:
    url: str
    speaking: bool
    chunks: list[bytes]
    decode_sample: bool = False
    light: bool = False  # idle frames: read the index from the text, no JSON parse (cheaper)
    audio_offset: float = 0.0  # s after INIT that the audio starts (its phase against the ticks)
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    frames: list[tuple[float, int, int | None, int | None]] = field(default_factory=list)
    send_times: list[float] = field(default_factory=list)
    send_late: list[float] = field(default_factory=list)  # s each chunk went after its deadline
    decoded: int = 0
    decode_errors: int = 0
    errors: list[str] = field(default_factory=list)
    _ended: dict[int, int] = field(default_factory=dict)
    _offset: dict[int, int] = field(default_factory=dict)

    async def start(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=16 << 20)
        await self.ws.send(json.dumps({"type": "INIT", "session_id": self.session_id,
                                       "data": {"user_id": "bench"}}))
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
        if reply.get("type") != "INIT_SUCCESS":
            raise RuntimeError(f"INIT failed: {reply}")
        self.video = reply["data"]["video_config"]
        self._decoder = av.CodecContext.create("h264", "r") if self.decode_sample else None
        self.tasks = [asyncio.create_task(self._receive())]
        if self.speaking:
            self.tasks.append(asyncio.create_task(self._stream()))

    async def _receive(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                if self.light and (index := _idle_frame_index(raw)) is not None:
                    self.frames.append((now, index, None, None))
                    continue
                env = json.loads(raw)
                kind, msg = env.get("type"), env.get("data") or {}
                if kind in ("VIDEO_FRAME", "ACTION_FRAME"):
                    uid = msg.get("utterance_id")
                    if uid is not None and uid not in self._offset:
                        self._offset[uid] = sum(self._ended.values())
                    self.frames.append((now, msg["frame_index"], uid, msg.get("utterance_frame")))
                    if self._decoder is not None and self.decoded + self.decode_errors < SAMPLE_DECODE:
                        try:
                            self.decoded += len(self._decoder.decode(
                                av.Packet(base64.b64decode(msg["frame_data"]))))
                        except av.FFmpegError:
                            self.decode_errors += 1
                elif kind == "SPEECH_ENDED":  # its frames, shown or dropped as too late
                    self._ended[msg["utterance_id"]] = msg["frames"] + msg.get("skipped", 0)
                elif kind == "ERROR":
                    self.errors.append(msg.get("code", "?"))
        except websockets.exceptions.ConnectionClosed:
            pass

    async def _stream(self) -> None:
        """Loop the WAV in real time on absolute deadlines; END_OF_SPEECH after every pass."""
        msgs = [json.dumps({"type": "GENERATE", "session_id": self.session_id, "data": {
            "audio_chunk": {"data": base64.b64encode(c).decode(), "format": "pcm_s16le",
                            "sample_rate": 16000, "channels": 1, "duration_ms": len(c) / 32}}})
                for c in self.chunks]
        eos = json.dumps({"type": "END_OF_SPEECH", "session_id": self.session_id, "data": {}})
        t0, k = time.monotonic() + self.audio_offset, 0
        while True:
            for text in msgs:
                delay = t0 + k * 0.04 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = time.monotonic()
                self.send_times.append(now)
                self.send_late.append(now - (t0 + k * 0.04))
                await self.ws.send(text)
                k += 1
            await self.ws.send(eos)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        try:
            await self.ws.send(json.dumps({"type": "CLOSE", "session_id": self.session_id}))
            await asyncio.wait_for(self.ws.close(), 3)
        except (websockets.exceptions.WebSocketException, OSError, TimeoutError):
            pass

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        fr = [f for f in self.frames if t0 <= f[0] <= t1]
        fps = (len(fr) - 1) / (fr[-1][0] - fr[0][0]) if len(fr) >= 2 and fr[-1][0] > fr[0][0] else 0.0
        gaps = sum(max(0, b[1] - a[1] - 1) for a, b in zip(fr, fr[1:], strict=False))
        lat = []
        for t, _, uid, uf in fr:
            if uid is not None and uf is not None:
                g = self._offset.get(uid, 0) + uf
                if g < len(self.send_times):
                    lat.append((t - self.send_times[g]) * 1000)
        late = [1000 * d for t, d in zip(self.send_times, self.send_late, strict=True) if t0 <= t <= t1]
        return {"fps": fps, "gaps": gaps, "lat": lat, "speech": sum(1 for f in fr if f[3] is not None),
                "send_late": late}


# ---------------------------------------------------------------------------- one level

async def probe_health(http: httpx.AsyncClient, seconds: float) -> tuple[list[float], dict]:
    """GET /health every 0.5 s for ``seconds``: response times in ms, and the last body."""
    out, end, body = [], time.monotonic() + seconds, {}
    while time.monotonic() < end:
        t = time.monotonic()
        body = (await http.get("/health")).json()
        out.append((time.monotonic() - t) * 1000)
        await asyncio.sleep(0.5)
    return out, body


async def run_level(server: Server, n: int, speaking: bool, chunks: list[bytes],
                    warmup: float, duration: float) -> dict[str, Any]:
    url = f"{server.ws}/musetalk/v1/ws/bench"
    # each client's audio starts at a random point of one frame period after its INIT (seeded):
    # a real client's audio bears no relation to its session's ticks, while audio sent at once
    # keeps the same offset to them in every session (with ticks counted from each session's
    # start, the longest offset: the weight-free engine then had almost no underruns)
    rng = random.Random(n)
    clients = [Client(url, speaking, chunks, decode_sample=(i == 0),
                      audio_offset=rng.uniform(0.0, 0.04)) for i in range(n)]
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        await asyncio.gather(*(c.start() for c in clients))
        await asyncio.sleep(warmup)
        s0 = await sessions(http)
        cpu0, me0, all0, t0 = server.cpu_s(), proc_cpu_s(os.getpid()), machine_busy_s(), time.monotonic()
        health, last_health = await probe_health(http, duration)
        t1, cpu1, me1, all1 = time.monotonic(), server.cpu_s(), proc_cpu_s(os.getpid()), machine_busy_s()
        s1 = await sessions(http)
        await asyncio.gather(*(c.stop() for c in clients))
        for _ in range(50):  # wait until the server has torn the sessions down
            if not await sessions(http):
                break
            await asyncio.sleep(0.1)
    wall = t1 - t0
    per = [c.window(t0, t1) for c in clients]
    skipped, dropped, underruns, srv_p50, srv_p95, copied, sent = [], [], [], [], [], [], []
    # /sessions keeps each session's last LATENCY_SAMPLES latencies: fewer means they reach
    # back to its first speech frame, warm-up included
    from websocket_service.stats import LATENCY_SAMPLES  # noqa: PLC0415
    from_start: list[bool] = []
    for c in clients:
        a, b = s0.get(c.session_id), s1.get(c.session_id)
        if a is None or b is None:
            continue
        frames = max(1, b["frames_emitted"] - a["frames_emitted"] + b["skipped_frames"] - a["skipped_frames"])
        skipped.append((b["skipped_frames"] - a["skipped_frames"]) / frames)
        dropped.append(b["dropped_frames"] - a["dropped_frames"])
        underruns.append(b["underruns"] - a["underruns"])
        copied.append(b.get("loop_frames", 0) - a.get("loop_frames", 0))
        sent.append(b["frames_sent"] - a["frames_sent"])
        if b["latency_ms"]["p50"] is not None:
            srv_p50.append(b["latency_ms"]["p50"])
            srv_p95.append(b["latency_ms"]["p95"])
            from_start.append(b["latency_ms"]["samples"] < LATENCY_SAMPLES)
    fps = [p["fps"] for p in per]
    lat = [x for p in per for x in p["lat"]]
    server_cpu = (cpu1 - cpu0) / wall
    res = {
        "n": n, "speaking": speaking, "wall": wall,
        "fps_median": median(fps), "fps_min": min(fps),
        "gaps": sum(p["gaps"] for p in per), "skipped_max": max(skipped, default=0.0),
        "dropped": sum(dropped), "underruns": sum(underruns),
        "speech_frames": sum(p["speech"] for p in per),
        "loop_share": sum(copied) / max(1, sum(sent)),
        "health_p95": pct(health, 95), "health_max": max(health, default=None),
        "server_cpu": server_cpu, "cpu_per_session": server_cpu / n, "client_cpu": (me1 - me0) / wall,
        "other_cpu": max(0.0, (all1 - all0 - (cpu1 - cpu0) - (me1 - me0)) / wall),
        "srv_lat_p50": median(srv_p50) if srv_p50 else None,
        "srv_lat_p95": median(srv_p95) if srv_p95 else None,
        "srv_lat_p95_worst": max(srv_p95) if srv_p95 else None,
        "lat_from_start": sum(from_start),
        "loop_lag_p99": (last_health.get("event_loop_lag_ms") or {}).get("p99"),
        "engine": last_health.get("engine"),
        "gpu_standin": (last_health.get("engine_info") or {}).get("gpu_standin"),
        "cli_lat_p50": pct(lat, 50), "cli_lat_p95": pct(lat, 95),
        "send_late_p99": pct([x for p in per for x in p["send_late"]], 99),
        "cli_lat_p95_worst": max((pct(p["lat"], 95) or 0.0 for p in per if p["lat"]), default=None),
        "decoded": f"{clients[0].decoded}/{clients[0].decoded + clients[0].decode_errors}",
        "errors": sorted({e for c in clients for e in c.errors}),
        "video": clients[0].video,
    }
    res["underrun_share"] = res["underruns"] / max(1, res["speech_frames"])
    res["holds"] = (res["fps_median"] >= HOLD_FPS and res["skipped_max"] <= HOLD_SKIP
                    and (not speaking or res["underrun_share"] <= HOLD_UNDERRUNS))
    return res


async def ramp(server: Server, levels: list[int], speaking: bool, chunks: list[bytes],
               warmup: float, duration: float) -> list[dict[str, Any]]:
    out = []
    for n in levels:
        r = await run_level(server, n, speaking, chunks, warmup, duration)
        if not r["holds"] and r["other_cpu"] > RETRY_OTHER:  # the machine was busy: try once more
            print(f"  N={n} failed with {100 * r['other_cpu']:.0f}% other load; retrying",
                  file=sys.stderr)
            r = await run_level(server, n, speaking, chunks, warmup, duration)
            r["retried"] = True
        out.append(r)
        kind = "speaking" if speaking else "idle"
        print(f"  {kind:8s} N={n:3d} fps median {r['fps_median']:.2f} min {r['fps_min']:.2f} "
              f"skipped max {100 * r['skipped_max']:.1f}% server CPU {100 * r['server_cpu']:.0f}% "
              f"client CPU {100 * r['client_cpu']:.0f}% other {100 * r['other_cpu']:.0f}% -> {'holds' if r['holds'] else 'FAILS'}",
              file=sys.stderr)
        if not r["holds"]:
            break
    return out


# ---------------------------------------------------------------------------- report

def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {"cpu": model, "cores": str(os.cpu_count()), "mem": f"{int(mem) / 2**20:.0f} GiB",
            "python": platform.python_version(), "av": av.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "x264_ms": f"{encode_reference_ms():.2f}"}


def encode_reference_ms() -> float:
    """Median ms of one 512x512 x264 P-frame on one thread (the service's settings): the same
    model name has shown 0.9 and 1.6-2.3 ms on different days, so each run records it."""
    from skimage.data import astronaut

    from websocket_service.media.encoder import H264Encoder

    img = astronaut()  # 512x512 RGB
    enc = H264Encoder(512, 512)
    times = []
    for i in range(60):
        frame = np.roll(img, i % 8, axis=1)  # a small pan: P-frames with real motion
        t = time.perf_counter()
        enc.encode(frame)
        times.append(time.perf_counter() - t)
    return 1000 * median(times[10:])


def _share(r: dict[str, Any]) -> str:
    return f" ({100 * r['underrun_share']:.1f}%)" if r["speech_frames"] else ""


def _from_start(r: dict[str, Any]) -> str:
    """How many sessions' server latency reaches back to their first speech frame."""
    return f"{r['lat_from_start']} of {r['n']}" if r["speaking"] else "n/a"


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| N | client fps median (min) | frame_index gaps | skipped max | dropped | underruns "
           "| server CPU | CPU / session | client CPU | other load | server latency p50 / p95 / worst session's p95 ms "
           "| latency from start "
           "| client latency p50 / p95 / worst session's p95 ms | frames from shared loops | /health p95 / max ms "
           "| event loop lag p99 ms | client sends late p99 ms | sample decoded | holds |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        out.append(
            f"| {r['n']}{' (retry)' if r.get('retried') else ''} | {r['fps_median']:.2f} ({r['fps_min']:.2f}) | {r['gaps']} "
            f"| {100 * r['skipped_max']:.1f}% | {r['dropped']} | {r['underruns']}"
            f"{_share(r)} "
            f"| {100 * r['server_cpu']:.0f}% | {100 * r['cpu_per_session']:.1f}% "
            f"| {100 * r['client_cpu']:.0f}% | {100 * r['other_cpu']:.0f}% | {_f(r['srv_lat_p50'])} / {_f(r['srv_lat_p95'])} / {_f(r['srv_lat_p95_worst'])} "
            f"| {_from_start(r)} "
            f"| {_f(r['cli_lat_p50'])} / {_f(r['cli_lat_p95'])} / {_f(r['cli_lat_p95_worst'])} "
            f"| {100 * r['loop_share']:.0f}% "
            f"| {_f(r['health_p95'])} / {_f(r['health_max'])} | {_f(r['loop_lag_p99'])} "
            f"| {_f(r.get('send_late_p99'))} | {r['decoded']} "
            f"| {'yes' if r['holds'] else '**no**'}{' ' + ','.join(r['errors']) if r['errors'] else ''} |")
    return out


def engine_label(engine: str | None, gpu_standin: str | None) -> str:
    """'engine X', and what a GPU stand-in is, from ``/health``'s engine and gpu_standin."""
    if gpu_standin:
        return (f"engine {engine} with GPU_STANDIN={gpu_standin} (the networks replaced by an "
                "H100's measured per-batch waits: a prediction of the host side, not inference)")
    return f"engine {engine or 'geometric'}"


def _engine(rows: list[dict[str, Any]]) -> str:
    return engine_label(rows[0].get("engine"), rows[0].get("gpu_standin"))


def per_session_cpu(rows: list[dict[str, Any]]) -> float:
    """Median server CPU per session over the levels with N >= 2 that hold (else all levels)."""
    held = [r["cpu_per_session"] for r in rows if r["holds"] and r["n"] >= 2]
    return median(held or [r["cpu_per_session"] for r in rows])


def best(rows: list[dict[str, Any]]) -> int:
    return max((r["n"] for r in rows if r["holds"]), default=0)


def report(m: dict[str, str], args: argparse.Namespace, baseline: float, idle: list[dict[str, Any]],
           speak: list[dict[str, Any]], problems: list[str]) -> str:
    v = (idle or speak)[0]["video"]
    held_i, held_s = best(idle), best(speak)
    cpu_i, cpu_s = per_session_cpu(idle), per_session_cpu(speak)
    peak = max(r["server_cpu"] for r in idle + speak)
    lat_s = [r for r in speak if r["holds"]] or speak
    lines = [
        "## Session capacity benchmark (`bench/bench_sessions.py`)", "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem']} RAM, no GPU; Python {m['python']}, "
        f"PyAV {m['av']}; {m['date']}. Speed reference: one 512x512 x264 frame encodes in "
        f"{m['x264_ms']} ms (median, one thread, measured before the run).",
        f"- Server: `run_server.py` in a subprocess, {_engine(idle or speak)}, default avatar, "
        f"{v['width']}x{v['height']} H.264 {v['bitrate'] // 1000} kbit/s, {v['fps']} fps, GOP {v['gop_frames']}. "
        f"Clients: one asyncio process on the same cores ({'quick' if args.quick else 'full'} run: "
        f"{args.warmup:g} s warm-up, {args.duration:g} s measured per level); each speaking "
        "client starts its audio at a random point (seeded) of the frame period after its INIT.",
        f"- A level holds if the median client fps >= {HOLD_FPS}, no session skipped more "
        f"than {100 * HOLD_SKIP:g}% of its frames and (speaking) underruns are at most "
        f"{100 * HOLD_UNDERRUNS:g}% of the speech frames received; a failing level is run once more if other processes used over "
        f"{100 * RETRY_OTHER:.0f}% CPU meanwhile; the ramp stops at the first level that fails.",
        f"- CPU is % of one core (the machine has {m['cores']}00%); server CPU includes its child "
        f"processes (ENCODER_PROCESSES={os.environ.get('ENCODER_PROCESSES', 'default')}); server with no session: "
        f"{100 * baseline:.1f}%."
        + (f" A busy loop took {100 * args.busy_share:.0f}% of one core beside them all run "
           "long (`--busy-share`)." if args.busy_share > 0 else "")
        + " 'other load' is the CPU that the rest of the machine used "
        f"during the window (busy time from /proc/stat minus server and clients); the largest "
        f"was {100 * max(r['other_cpu'] for r in idle + speak):.0f}%: a shared machine "
        "lowers the numbers below.", "",
        "### Summary", "",
        f"- Idle sessions holding 25 fps: **{held_i}**"
        + (f" (fails at {idle[-1]['n']})" if idle and not idle[-1]["holds"] else " (highest level tried)"),
        f"- Speaking sessions holding 25 fps: **{held_s}**"
        + (f" (fails at {speak[-1]['n']})" if speak and not speak[-1]["holds"] else " (highest level tried)"),
        f"- Server CPU per session (median over the levels N >= 2 that hold): idle **{100 * cpu_i:.1f}%**, "
        f"speaking **{100 * cpu_s:.1f}%** of a core (speaking / idle = {cpu_s / cpu_i:.2f}x); "
        f"the highest server CPU seen at any level was {100 * peak:.0f}% of the {m['cores']}00% "
        f"available. At these costs one fully available core carries about {1 / cpu_i:.0f} idle or "
        f"{1 / cpu_s:.0f} speaking sessions (a projection, not a measurement).",
        f"- Latency, speaking, median over levels that hold: server (audio chunk in -> frame sent) "
        f"p50 **{_f(med([r['srv_lat_p50'] for r in lat_s]))} ms**, "
        f"p95 **{_f(med([r['srv_lat_p95'] for r in lat_s]))} ms**; "
        f"client (chunk sent -> frame received) p50 "
        f"**{_f(med([r['cli_lat_p50'] for r in lat_s]))} ms**, "
        f"p95 **{_f(med([r['cli_lat_p95'] for r in lat_s]))} ms** "
        "(includes the engine's 40 ms look-ahead and up to one frame period of pacing).",
        f"- Server log: {len(problems)} warning/error lines"
        + (":" if problems else "."), *[f"  - `{p[:200]}`" for p in problems[:8]], "",
        "### Idle sessions", "", *table(idle), "",
        "### Speaking sessions (speech_pauses_16k.wav, real time, looping)", "", *table(speak), "",
        "Columns: fps and frame_index gaps are measured by the clients in the window; skipped, "
        "dropped and underruns are the server's `/sessions` counters over the window (skipped max "
        "is the worst session's share); server latency is the median over sessions of each "
        "session's `/sessions` latency_ms, that is over its last 500 speech frames (about 27 s "
        "of this speech): the window and the seconds before it, from the session's first frame "
        "on (its start: the jitter allowance not yet learned, every session's first keyframe at "
        "once) where 'latency from start' counts it (a warm-up of 10 s or more leaves the start "
        "out at a 20 s window); client latency pools every speech frame of the window; "
        "'client sends late p99' is how late the clients' audio chunks left against their "
        "real-time deadlines (a starved load generator would send in bursts, which the server "
        "would see as network jitter); 'sample decoded' is how many of the first frames of one client "
        "PyAV decoded.", "",
    ]
    return "\n".join(lines)


#: a busy loop taking ``share`` of one core: busy, then asleep, in 10 ms periods
BUSY_LOOP = """
import sys, time
share = float(sys.argv[1])
while True:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.01 * share:
        pass
    time.sleep(0.01 * (1 - share))
"""


def start_busy_loop(share: float) -> subprocess.Popen | None:
    """Other work on the machine, for ``--busy-share`` (None: none asked)."""
    if share <= 0:
        return None
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(share)])


async def amain(args: argparse.Namespace) -> str:
    chunks = load_chunks()
    top = max(args.idle_levels + args.speaking_levels)
    server = Server.on_free_port("bench-sessions-", max_sessions=top + 4)
    busy = None
    try:
        server.wait_ready()
        c0, t0 = server.cpu_s(), time.monotonic()
        await asyncio.sleep(2)
        baseline = (server.cpu_s() - c0) / (time.monotonic() - t0)
        busy = start_busy_loop(args.busy_share)
        idle = await ramp(server, args.idle_levels, False, chunks, args.warmup, args.duration)
        speak = await ramp(server, args.speaking_levels, True, chunks, args.warmup, args.duration)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        server.stop()
    return report(machine(), args, baseline, idle, speak, server.log_problems())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer levels, shorter windows (~1 min)")
    ap.add_argument("--idle-levels", help="comma-separated idle session counts (default: a ramp)")
    ap.add_argument("--speaking-levels", help="comma-separated speaking session counts")
    ap.add_argument("--duration", type=float, help="measured seconds per level")
    ap.add_argument("--warmup", type=float,
                    help="seconds between a level's sessions opening and its window (default 1; "
                         "speaking levels' server latency leaves the sessions' first seconds "
                         "out only when this is long enough: see the report's note)")
    ap.add_argument("--busy-share", type=float, default=0.0,
                    help="a busy loop taking this share (0-1) of one core runs beside the "
                         "server and clients (how much of the machine the figures need; it "
                         "shows in 'other load')")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_sessions.md"))
    args = ap.parse_args(argv)
    if not 0 <= args.busy_share < 1:
        ap.error("--busy-share is a share of one core, 0 <= share < 1")
    idle = "1,8,16,32" if args.quick else "1,8,16,32,48,64,80,96,128"
    speaking = "1,4,8" if args.quick else "1,4,8,10,12,14,16,20,24"
    args.idle_levels = sorted({int(x) for x in (args.idle_levels or idle).split(",")})
    args.speaking_levels = sorted({int(x) for x in (args.speaking_levels or speaking).split(",")})
    args.duration = args.duration or (3.0 if args.quick else 6.0)
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    publish(asyncio.run(amain(args)), args.out)
    return 0


def publish(text: str, out: str | Path) -> None:
    """Print a report and write it to ``out`` (its folder made if need be)."""
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
