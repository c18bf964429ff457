"""What session affinity costs on the cluster: Serve's default router vs ours, same cluster.

    python -m bench.bench_cluster_affinity            # ~40 s on 2 cores
    python -m bench.bench_cluster_affinity --quick    # ~30 s

The service runs on Ray Serve in this process (two CPU replicas of the weight-free engine, as
``test/test_cluster.py`` starts it), once with the session replicas' router set to Serve's
default (power of two choices, no affinity) and once with ours
(:class:`websocket_service.cluster.routing.SessionRouter`: a registry lookup for a request that
names a session, a placement for a new one). Medians over sequential requests:

* a new session: connect to ``INIT_SUCCESS`` (ours: one placement call to the registry, and the
  replica's claim before ``INIT_SUCCESS``);
* a viewer: connect with ``?session_id=`` to its first reply (ours: one lookup; Serve's router
  sends half of them to the wrong replica, which answers at once with an error);
* a REST control through the front, ``POST /sessions/{id}/end_of_speech`` (ours: one lookup);
* a message on an open socket, ``PING`` -> ``PONG``: routing happens once per socket, so this,
  and every frame, costs the same with either router;
* one registry lookup from this process (what the router adds to a request naming a session).

Writes a markdown section to stdout and to docs/bench_cluster_affinity.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import websockets

from bench.bench_sessions import machine
from websocket_service.cluster import deployments, registry, runner
from websocket_service.cluster.settings import ClusterSettings
from websocket_service.config import Settings
from websocket_service.manager import Services

ROOT = Path(__file__).resolve().parent.parent
POW2 = "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter"
ROUTERS = {"Serve's default (no affinity)": POW2, "session affinity": deployments.SESSION_ROUTER}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(type_: str, sid: str, **data: Any) -> str:
    return json.dumps({"type": type_, "session_id": sid, "data": data})


async def first_reply(ws: Any) -> dict[str, Any]:
    while (msg := json.loads(await ws.recv()))["type"] == "VIDEO_FRAME":
        pass
    return msg


async def new_session(base: str, user: str) -> tuple[Any, str, float]:
    t0 = time.perf_counter()
    ws = await websockets.connect(f"{base}/musetalk/v1/ws/{user}", max_size=2**24)
    sid = str(uuid.uuid4())
    await ws.send(env("INIT", sid, user_id=user))
    reply = await first_reply(ws)
    assert reply["type"] == "INIT_SUCCESS", reply
    return ws, sid, (time.perf_counter() - t0) * 1000


async def measure(base: str, http: str, n: int) -> dict[str, float]:
    connect = []
    for i in range(n):
        ws, _, ms = await new_session(base, f"c{i}")
        connect.append(ms)
        await ws.close()
    owner, sid, _ = await new_session(base, "owner")
    viewer = []
    for i in range(n):
        t0 = time.perf_counter()
        async with websockets.connect(f"{base}/musetalk/v1/ws/v{i}?session_id={sid}") as ws:
            await ws.send(env("INIT", sid, user_id=f"v{i}", viewer=True))
            await first_reply(ws)
            viewer.append((time.perf_counter() - t0) * 1000)
    control = []
    async with httpx.AsyncClient(base_url=http, timeout=30) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            await client.post(f"/sessions/{sid}/end_of_speech")
            control.append((time.perf_counter() - t0) * 1000)
    ping = []
    for _ in range(4 * n):
        t0 = time.perf_counter()
        await owner.send(env("PING", sid, t=t0))
        while (await first_reply(owner))["type"] != "PONG":
            pass
        ping.append((time.perf_counter() - t0) * 1000)
    await owner.close()
    reg = registry.get()
    lookup = []
    for _ in range(4 * n):
        t0 = time.perf_counter()
        await reg.lookup.remote(sid)
        lookup.append((time.perf_counter() - t0) * 1000)
    return {"connect": median(connect), "viewer": median(viewer), "control": median(control),
            "ping": median(ping), "lookup": median(lookup)}


def run(router: str, n: int, avatars: Path) -> dict[str, float]:
    deployments.SESSION_ROUTER = router
    port = free_port()
    settings = Settings(avatars_dir=avatars, port=port, host="127.0.0.1", max_sessions=16,
                        log_level="warning")
    spec = ClusterSettings(replicas=2, replica_cpus=0.5, drain_timeout_s=1.0, ray_address=None)
    started = runner.start_ray(spec, num_cpus=2, log_to_driver=False)
    try:
        runner.deploy(settings, spec)
        return asyncio.run(measure(f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}", n))
    finally:
        runner.shutdown(started)


def report(m: dict[str, str], r: dict[str, dict[str, float]], n: int, load: str) -> str:
    names = list(r)
    rows = [("new session: connect to INIT_SUCCESS", "connect"),
            ("viewer: connect with ?session_id= to its first reply", "viewer"),
            ("REST control through the front (POST .../end_of_speech)", "control"),
            ("message on an open socket (PING -> PONG)", "ping"),
            ("one registry lookup (an actor call, from this process)", "lookup")]
    lines = [f"**{m['cpu']}**, {m['cores']} cores, Python {m['python']}; ray 2.60.0; {n} "
             f"sequential requests of each kind ({4 * n} pings), medians in ms; two CPU "
             "replicas of the weight-free engine in this process's Ray; load average "
             f"{load} (1, 5, 15 min) at the end.", "",
             f"| | {names[0]} | {names[1]} | difference |", "| --- | --- | --- | --- |"]
    for label, key in rows:
        a, b = r[names[0]][key], r[names[1]][key]
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int)
    args = p.parse_args(argv)
    n = args.n or (10 if args.quick else 30)
    avatars = ROOT / "data" / "bench-affinity-avatars"
    Services(Settings(avatars_dir=avatars)).ensure_default_avatar()
    results = {name: run(router, n, avatars) for name, router in ROUTERS.items()}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = report(machine(), results, n, load)
    print(text)
    (ROOT / "docs" / "bench_cluster_affinity.md").write_text(
        "# Session affinity's cost (bench/bench_cluster_affinity.py)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
