"""Open and close sessions in a row and watch the server's memory: it must stay flat.

    python -m bench.churn [--sessions 10000] [--every 500] [--warmup 200] [--parallel 4]
                          [--rtc-every 20]

Runs the real app (default engine, in-process encoders) on a loopback port in this process
and churns sessions the ways clients end them (CLOSE, a closing handshake without CLOSE,
a dropped TCP connection, mid-speech, mid-action, before INIT; and every ``--rtc-every``-th
over WebRTC; see test/churn_support.py).
Every ``--every`` sessions it prints the process RSS, live sessions, server tasks, threads
and file descriptors. The drift is RSS at the end minus RSS after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from collections import Counter
from pathlib import Path

from test.churn_support import churn, snapshot, wait_idle
from test.live_server import LiveServer, free_port
from test.support import rss_mb
from websocket_service.config import Settings


async def run(args: argparse.Namespace, server: LiveServer) -> float:
    await churn(server, args.warmup, parallel=args.parallel, rtc_every=args.rtc_every)
    await wait_idle(server)
    base = rss_mb()
    t0 = time.monotonic()
    print(f"after warm-up ({args.warmup} sessions): RSS {base:.0f} MB", flush=True)
    print("sessions   RSS MB  drift   tasks threads fds  sessions/s", flush=True)
    done = 0
    kinds: Counter[str] = Counter()
    while done < args.sessions:
        n = min(args.every, args.sessions - done)
        kinds += await churn(server, n, start=args.warmup + done, parallel=args.parallel,
                             rtc_every=args.rtc_every)
        done += n
        await wait_idle(server)
        gc.collect()  # counts of live objects, not of garbage a collection would free
        snap = snapshot(server)
        rss = rss_mb()
        rate = done / (time.monotonic() - t0)
        print(f"{done:8d} {rss:8.0f} {rss - base:+6.0f} {len(snap['tasks']):7d} "
              f"{snap['threads']:7d} {snap['fds']:4d} {rate:10.1f}", flush=True)
    print("ended:", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())), flush=True)
    return rss_mb() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--rtc-every", type=int, default=20,
                    help="every N-th session is a WebRTC one (0: none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(avatars_dir=Path(tmp), port=free_port(), max_sessions=64,
                            rtc_host_addresses=["127.0.0.1"])
        server = LiveServer(settings).start()
        try:
            drift = asyncio.run(run(args, server))
        finally:
            server.stop()
    print(f"RSS drift after warm-up: {drift:+.0f} MB over {args.sessions} sessions")


if __name__ == "__main__":
    main()
