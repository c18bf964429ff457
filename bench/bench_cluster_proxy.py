"""What Ray Serve's proxy costs a WebSocket: round trip and CPU per stream, Serve vs uvicorn.

    python -m bench.bench_cluster_proxy            # ~2 min
    python -m bench.bench_cluster_proxy --quick    # ~1 min

The same tiny FastAPI app runs twice, each time in a server subprocess whose whole process tree's
CPU is read from /proc (uvicorn alone; then Ray started in the subprocess, with Serve's proxy in
front of one replica, exactly as ``websocket_service.cluster`` deploys the service). It echoes
small messages (the round trip of a control message: median over sequential pings) and streams
frames of the service's size (``FRAME_BYTES``, base64 JSON of a 1 Mbit/s H.264 frame) at 25 fps
to ``STREAMS`` sockets; the server's CPU over that window, less its idle CPU over a window of the
same length (Ray's own background work), divided by the streams is the per-stream cost. The
clients run in this process, outside the measured tree.

Writes a markdown section to stdout and to docs/bench_cluster_proxy.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import websockets
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from bench.bench_sessions import _f, machine, tree_cpu_s

ROOT = Path(__file__).resolve().parent.parent
FRAME_BYTES = 7_000
STREAMS = 4
FPS = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ok": True}

    @app.websocket("/echo")
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            pass

    @app.websocket("/stream")
    async def stream(ws: WebSocket) -> None:
        """Frames at 25 fps on absolute deadlines, like the service's pacer."""
        await ws.accept()
        payload = json.dumps({"type": "VIDEO_FRAME", "data": "A" * FRAME_BYTES})
        t0, n = time.monotonic(), 0
        try:
            while True:
                n += 1
                await asyncio.sleep(max(0.0, t0 + n / FPS - time.monotonic()))
                await ws.send_text(payload)
        except (WebSocketDisconnect, RuntimeError):
            pass

    return app


def serve_direct(port: int) -> None:
    import uvicorn

    uvicorn.run(build_app(), host="127.0.0.1", port=port, log_level="warning")


def serve_ray(port: int) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray: loopback only
    from ray import serve

    from bench import bench_cluster_proxy  # by reference: this file runs as __main__
    from websocket_service.cluster import runner
    from websocket_service.cluster.settings import ClusterSettings

    runner.start_ray(ClusterSettings(ray_address=None), num_cpus=2)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(max_ongoing_requests=64)
    @serve.ingress(bench_cluster_proxy.build_app)
    class Echo:
        pass

    serve.run(Echo.bind(), name="bench", route_prefix="/")
    while True:
        time.sleep(3600)


class Server:
    def __init__(self, mode: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_cluster_proxy", f"--serve-{mode}", str(self.port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{mode} server did not start")
            time.sleep(0.5)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def round_trips(port: int, n: int) -> list[float]:
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
        for _ in range(20):  # warm up
            await ws.send('{"type":"PING"}')
            await ws.recv()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await ws.send('{"type":"PING"}')
            await ws.recv()
            out.append((time.perf_counter() - t) * 1000)
        return out


async def stream_window(server: Server, seconds: float) -> dict[str, float]:
    counts = [0] * STREAMS

    async def one(i: int, ws: Any) -> None:
        async for _ in ws:
            counts[i] += 1

    socks = [await websockets.connect(f"ws://127.0.0.1:{server.port}/stream", max_size=2**22)
             for _ in range(STREAMS)]
    tasks = [asyncio.create_task(one(i, ws)) for i, ws in enumerate(socks)]
    await asyncio.sleep(1.0)  # settle
    c0, n0, t0 = server.cpu_s(), sum(counts), time.monotonic()
    await asyncio.sleep(seconds)
    c1, n1, t1 = server.cpu_s(), sum(counts), time.monotonic()
    for ws in socks:
        await ws.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"cpu": (c1 - c0) / (t1 - t0), "fps": (n1 - n0) / (t1 - t0) / STREAMS}


async def measure(mode: str, pings: int, seconds: float) -> dict[str, float]:
    server = Server(mode)
    try:
        await asyncio.sleep(2.0)
        c0, t0 = server.cpu_s(), time.monotonic()
        await asyncio.sleep(seconds)
        idle = (server.cpu_s() - c0) / (time.monotonic() - t0)
        rtt = await round_trips(server.port, pings)
        s = await stream_window(server, seconds)
        return {"rtt_p50": median(rtt), "rtt_p95": sorted(rtt)[int(0.95 * len(rtt))],
                "idle": idle, "cpu": s["cpu"], "per_stream": (s["cpu"] - idle) / STREAMS,
                "fps": s["fps"]}
    finally:
        server.stop()


def report(m: dict[str, str], r: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    d, s = r["direct"], r["ray"]
    rows = [
        "| | uvicorn alone | Ray Serve proxy + replica | ratio |", "| --- | --- | --- | --- |",
        f"| small-message round trip, median (ms) | {_f(d['rtt_p50'], '{:.2f}')} | "
        f"{_f(s['rtt_p50'], '{:.2f}')} | {s['rtt_p50'] / d['rtt_p50']:.1f}x |",
        f"| round trip p95 (ms) | {_f(d['rtt_p95'], '{:.2f}')} | {_f(s['rtt_p95'], '{:.2f}')} | |",
        f"| server CPU idle (% of a core) | {100 * d['idle']:.1f} | {100 * s['idle']:.1f} | |",
        f"| server CPU, {STREAMS} streams (% of a core) | {100 * d['cpu']:.1f} | "
        f"{100 * s['cpu']:.1f} | |",
        f"| CPU per stream above idle (% of a core) | {100 * d['per_stream']:.2f} | "
        f"{100 * s['per_stream']:.2f} | {s['per_stream'] / max(d['per_stream'], 1e-9):.1f}x |",
        f"| frames/s per stream received | {d['fps']:.1f} | {s['fps']:.1f} | |",
    ]
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem']}, Python {m['python']}, "
        f"ray {args.ray_version}; {m['date']}. {args.pings} sequential pings; {STREAMS} streams "
        f"of {FRAME_BYTES} B frames at {FPS} fps for {args.seconds:g} s.", "", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--serve-direct", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-ray", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_direct:
        serve_direct(args.serve_direct)
        return 0
    if args.serve_ray:
        serve_ray(args.serve_ray)
        return 0
    from importlib.metadata import version

    args.ray_version = version("ray")
    args.pings, args.seconds = (200, 5.0) if args.quick else (500, 15.0)
    results = {mode: asyncio.run(measure(mode, args.pings, args.seconds))
               for mode in ("direct", "ray")}
    text = report(machine(), results, args)
    print(text)
    (ROOT / "docs" / "bench_cluster_proxy.md").write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
