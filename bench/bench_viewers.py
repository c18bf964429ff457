"""Viewer benchmark: one speaking session, N receive-only WebSocket viewers of it.

    python bench/bench_viewers.py                  # 10, 25, 50, 100 WebSocket viewers
    python bench/bench_viewers.py --levels 100 --duration 10
    python bench/bench_viewers.py --transport rtc --levels 2,4,8,12   # aiortc viewers

The server runs in a subprocess (as in bench_sessions.py). One owner streams
fixtures/speech_pauses_16k.wav in real time, looping; N viewers attach with
``INIT.data.viewer`` and count frames (they parse every message; one of them decodes a
sample to prove the stream is valid H.264). The session is encoded once; every viewer gets
the same messages. A level holds if the median viewer fps >= 24.5 and the slowest viewer
>= 24. Writes a markdown section to stdout and to docs/bench_viewers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import av
import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_sessions import (  # noqa: E402
    HOLD_FPS,
    ROOT,
    Client,
    Server,
    load_chunks,
    machine,
    machine_busy_s,
    proc_cpu_s,
)


class RtcViewer:
    """An aiortc peer viewing the session (POST /offer with session_id); it decodes every
    frame, as a browser would, on the same cores as the server."""

    def __init__(self, http: str, session_id: str) -> None:
        from test.rtc_client import ClientPeer  # noqa: PLC0415 - aiortc only for this mode

        self.http, self.session_id = http, session_id
        self.peer = ClientPeer()
        self.count0 = 0

    async def start(self) -> None:
        offer = await self.peer.offer()
        async with httpx.AsyncClient(base_url=self.http, timeout=20) as http:
            r = await http.post("/offer", json={"sdp": offer.sdp, "type": "offer",
                                                "session_id": self.session_id})
            r.raise_for_status()
        await self.peer.accept(r.json()["sdp"])
        await self.peer.wait_connected(20)

    def mark(self) -> None:
        self.count0 = self.peer.video_frames

    def window(self, t0: float, t1: float) -> tuple[float, int]:
        return (self.peer.video_frames - self.count0) / (t1 - t0), 0

    async def stop(self) -> None:
        await self.peer.close()


class Viewer:
    def __init__(self, url: str, session_id: str, decode: bool) -> None:
        self.url, self.session_id = url, session_id
        self.times: list[tuple[float, int]] = []
        self.decoder = av.CodecContext.create("h264", "r") if decode else None
        self.decoded = self.decode_errors = 0

    async def start(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=16 << 20)
        await self.ws.send(json.dumps({"type": "INIT", "session_id": self.session_id,
                                       "data": {"user_id": "viewer", "viewer": True}}))
        reply = json.loads(await self.ws.recv())
        if reply.get("type") != "INIT_SUCCESS":
            raise RuntimeError(f"viewer INIT failed: {reply}")
        self.task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                env = json.loads(raw)
                if env["type"] not in ("VIDEO_FRAME", "ACTION_FRAME"):
                    continue
                d = env["data"]
                self.times.append((now, d["frame_index"]))
                if self.decoder is not None and self.decoded + self.decode_errors < 50:
                    try:
                        self.decoded += len(self.decoder.decode(
                            av.Packet(base64.b64decode(d["frame_data"]))))
                    except av.FFmpegError:
                        self.decode_errors += 1
        except websockets.exceptions.ConnectionClosed:
            pass

    def mark(self) -> None:
        pass

    def window(self, t0: float, t1: float) -> tuple[float, int]:
        fr = [f for f in self.times if t0 <= f[0] <= t1]
        if len(fr) < 2:
            return 0.0, 0
        gaps = sum(max(0, b[1] - a[1] - 1) for a, b in zip(fr, fr[1:], strict=False))
        return (len(fr) - 1) / (fr[-1][0] - fr[0][0]), gaps

    async def stop(self) -> None:
        await self.ws.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def run_level(server: Server, n: int, duration: float, rtc: bool) -> dict[str, Any]:
    owner = Client(f"{server.ws}/musetalk/v1/ws/bench", True, load_chunks())
    await owner.start()
    views: list[Any] = [
        RtcViewer(server.http, owner.session_id) if rtc
        else Viewer(f"{server.ws}/musetalk/v1/ws/viewer", owner.session_id, i == 0)
        for i in range(n)]
    for v in views:  # one at a time: each attach asks the feed for a keyframe
        await v.start()
    await asyncio.sleep(1.0)
    for v in views:
        v.mark()
    cpu0, me0, all0, t0 = server.cpu_s(), proc_cpu_s(os.getpid()), machine_busy_s(), time.monotonic()
    await asyncio.sleep(duration)
    t1, cpu1, me1, all1 = time.monotonic(), server.cpu_s(), proc_cpu_s(os.getpid()), machine_busy_s()
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        info = (await http.get(f"/sessions/{owner.session_id}")).json()
    stats = [v.window(t0, t1) for v in views]
    owner_fps = owner.window(t0, t1)["fps"]
    await asyncio.gather(*(v.stop() for v in views))
    await owner.stop()
    wall = t1 - t0
    fps = [s[0] for s in stats]
    res = {"n": n, "fps_median": median(fps), "fps_min": min(fps), "owner_fps": owner_fps,
           "gaps": sum(s[1] for s in stats), "viewers_seen": info.get("viewers"),
           "server_cpu": (cpu1 - cpu0) / wall, "client_cpu": (me1 - me0) / wall,
           "other_cpu": max(0.0, (all1 - all0 - (cpu1 - cpu0) - (me1 - me0)) / wall),
           "decoded": "every frame (aiortc)" if rtc else
           f"{views[0].decoded}/{views[0].decoded + views[0].decode_errors}",
           "dropped": info.get("dropped_frames")}
    res["holds"] = res["fps_median"] >= HOLD_FPS and res["fps_min"] >= 24.0
    return res


def report(m: dict[str, str], rows: list[dict[str, Any]], duration: float, rtc: bool) -> str:
    kind = "WebRTC (aiortc, decoding every frame)" if rtc else "WebSocket"
    lines = [
        f"## {kind} viewers of one session (`bench/bench_viewers.py"
        f"{' --transport rtc' if rtc else ''}`)", "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem']} RAM; Python {m['python']}, "
        f"PyAV {m['av']}; {m['date']}. Server in a subprocess (weight-free engine, 512x512, "
        f"1 Mbit/s); all clients in one asyncio process on the same cores; {duration:g} s "
        "measured per level.",
        "- One owner speaks (speech_pauses_16k.wav, real time, looping); N viewers attach with "
        "`INIT.data.viewer`. The session is encoded once for all of them.", "",
        "| viewers | viewer fps median (min) | owner fps | frame_index gaps (all viewers) "
        "| session dropped_frames | server CPU | client CPU | other load | sample decoded | holds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['fps_median']:.2f} ({r['fps_min']:.2f}) | {r['owner_fps']:.2f} "
            f"| {r['gaps']} | {r['dropped']} | {100 * r['server_cpu']:.0f}% "
            f"| {100 * r['client_cpu']:.0f}% | {100 * r['other_cpu']:.0f}% | {r['decoded']} "
            f"| {'yes' if r['holds'] else '**no**'} |")
    lines += ["", "CPU is % of one core (the machine has 200%); 'other load' is what the rest "
              "of the machine used meanwhile.", ""]
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> str:
    if args.transport == "rtc":  # the server offers loopback candidates, takes many peers
        os.environ.update(RTC_HOST_ADDRESSES='["127.0.0.1"]',
                          MAX_RTC_CLIENTS=str(max(args.levels) + 4))
    server = Server.on_free_port("bench-viewers-", max_sessions=4)
    rows = []
    try:
        server.wait_ready()
        for n in args.levels:
            r = await run_level(server, n, args.duration, args.transport == "rtc")
            print(f"  viewers={n:4d} fps median {r['fps_median']:.2f} min {r['fps_min']:.2f} "
                  f"server CPU {100 * r['server_cpu']:.0f}% client CPU {100 * r['client_cpu']:.0f}% "
                  f"-> {'holds' if r['holds'] else 'FAILS'}", file=sys.stderr)
            rows.append(r)
    finally:
        server.stop()
    return report(machine(), rows, args.duration, args.transport == "rtc")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="10,25,50,100")
    ap.add_argument("--transport", choices=("ws", "rtc"), default="ws")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "docs" / f"bench_viewers_{args.transport}.md")
    args.levels = [int(x) for x in args.levels.split(",")]
    text = asyncio.run(amain(args))
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
