"""Soak: 8 sessions (speaking and idle mixed) for an hour; memory must not drift.

    python bench/soak.py                               # 1 hour, a line a minute
    python bench/soak.py --duration 600 --interval 60  # 10 minutes
    python bench/soak.py --duration 600 --stall-at 120 # ... with a 2 s stall of every client

The server runs in a subprocess (as in bench_sessions.py); 4 clients stream
fixtures/speech_pauses_16k.wav in real time, looping, and 4 stay idle. Every interval it
prints the server's RSS, the clients' fps (median and slowest), the speaking clients' latency
(chunk sent -> frame received) p50/p95 and the errors received. RSS drift is the last RSS
against the first interval's (after warm-up); it passes under 5 %. Writes
docs/bench_soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import httpx  # noqa: E402

from bench.bench_sessions import (  # noqa: E402
    ROOT,
    Client,
    Server,
    engine_label,
    load_chunks,
    machine,
    pct,
)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def soak(server: Server, duration: float, interval: float, stall_at: float | None = None,
               stall_for: float = 2.0) -> list[dict[str, float]]:
    chunks = load_chunks()
    url = f"{server.ws}/musetalk/v1/ws/bench"
    clients = [Client(url, i < 4, chunks) for i in range(8)]
    await asyncio.gather(*(c.start() for c in clients))
    rows: list[dict[str, float]] = []
    t_end = time.monotonic() + duration
    print("minute  RSS MB   fps median (min)   latency p50 / p95 ms   errors", flush=True)
    try:
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            await asyncio.sleep(min(interval, t_end - t0))
            if stall_at is not None and time.monotonic() - (t_end - duration) >= stall_at:
                # a client-side hiccup: every client stops sending and reading, then sends what
                # it owes at once (they stream on absolute deadlines), as a live client would
                time.sleep(stall_for)  # noqa: ASYNC251 - blocking the loop is the point
                stall_at = None
            t1 = time.monotonic()
            win = [c.window(t0, t1) for c in clients]
            lat = [x for w in win[:4] for x in w["lat"]]
            row = {"t": round((t1 - (t_end - duration)) / 60, 2), "rss": rss_mb(server.proc.pid),
                   "fps_med": median(w["fps"] for w in win), "fps_min": min(w["fps"] for w in win),
                   "p50": pct(lat, 50) or 0.0, "p95": pct(lat, 95) or 0.0,
                   "errors": float(sum(len(c.errors) for c in clients))}
            rows.append(row)
            print(f"{row['t']:6.1f}  {row['rss']:6.0f}   {row['fps_med']:5.2f} ({row['fps_min']:5.2f})"
                  f"      {row['p50']:6.0f} / {row['p95']:6.0f}         {row['errors']:.0f}",
                  flush=True)
    finally:
        await asyncio.gather(*(c.stop() for c in clients))
    return rows


def report(rows: list[dict[str, float]], args: argparse.Namespace, engine: str) -> str:
    m = machine()
    first, last = rows[0]["rss"], rows[-1]["rss"]
    drift = 100 * (last - first) / first
    lines = [
        "## Soak (`bench/soak.py`)", "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem']} RAM; {m['date']}. Server in a "
        f"subprocess ({engine}), 4 speaking + 4 idle WebSocket clients on the same "
        f"cores, {args.duration / 60:g} min, a line every {args.interval:g} s"
        + (f"; every client stalled for {args.stall_for:g} s at {args.stall_at:g} s (then sent "
           "what it owed at once)." if args.stall_at is not None else "."),
        f"- Server RSS {first:.0f} MB after the first interval, {last:.0f} MB at the end: drift "
        f"**{drift:+.1f} %** ({'under' if abs(drift) < 5 else '**over**'} the 5 % bound).", "",
        "| minute | RSS MB | fps median (min) | latency p50 / p95 ms | errors |",
        "|---:|---:|---|---|---:|",
        *[f"| {r['t']:.1f} | {r['rss']:.0f} | {r['fps_med']:.2f} ({r['fps_min']:.2f}) "
          f"| {r['p50']:.0f} / {r['p95']:.0f} | {r['errors']:.0f} |" for r in rows], ""]
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> str:
    server = Server.on_free_port("bench-soak-", max_sessions=16)
    try:
        server.wait_ready()
        health = httpx.get(f"{server.http}/health", timeout=10).json()
        engine = engine_label(health.get("engine"),
                              (health.get("engine_info") or {}).get("gpu_standin"))
        rows = await soak(server, args.duration, args.interval, args.stall_at, args.stall_for)
    finally:
        server.stop()
    return report(rows, args, engine)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between lines")
    ap.add_argument("--stall-at", type=float, help="seconds: stall every client once, then")
    ap.add_argument("--stall-for", type=float, default=2.0, help="seconds the stall lasts")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_soak.md"))
    args = ap.parse_args(argv)
    text = asyncio.run(amain(args))
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
