"""Speaking burst: N open sessions that all start speaking in the same instant, several times.

What a broadcast, a classroom or a load generator does, and what every session does at once
after a restart once its users talk again. ``bench/burst.py`` opens idle sessions only, and
``bench/bench_sessions.py`` leaves each session's first seconds out of its figures; this one
measures exactly those seconds. Run from the repository's root::

    ENGINE=musetalk GPU_STANDIN=h100 python -m bench.burst_speaking --sessions 16
    python -m bench.burst_speaking --sessions 10          # the weight-free engine

One server (the engine the environment selects), N sessions opened and idle for ``--idle``
seconds; then ``--bursts`` times: every client starts sending the speech fixture (one pass,
6.8 s, then END_OF_SPEECH) at the same moment, each at a random point of one frame period
after it (seeded; a real client's audio bears no relation to the server's ticks), and the
sessions go idle again for ``--gap`` seconds. Per burst it reports, over the sessions:

- time to the first speech frame: from a session's first chunk sent to the first frame of
  that utterance received (p50 and max);
- latency (chunk sent -> its frame received, client side, so with the engine's look-ahead)
  over the utterance's first 2 s of frames and over its frames from 4 s on (p50 / p95; the
  worst session's p95 in the first 2 s);
- the server's underruns and dropped frames over the burst (``/sessions`` counters) and its
  CPU in the burst's first 2 s and over the rest.

Writes a markdown section to stdout and to ``--out`` (default docs/bench_burst_speaking.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import time
from typing import Any

import httpx

from bench.bench_sessions import (
    ROOT,
    Client,
    Server,
    engine_label,
    load_chunks,
    machine,
    pct,
    publish,
    sessions,
)

FIRST_FRAMES = 50  # an utterance's first 2 s at 25 fps
STEADY_FROM = 100  # and its frames from 4 s on
SETTLE_S = 1.0  # after the last chunk of a burst, for its last frames to arrive


class BurstClient(Client):
    """A bench client that speaks only when told: :meth:`speak` sends one pass of the speech
    from a given moment, and records when each chunk left, per burst."""

    def __init__(self, url: str, chunks: list[bytes], offset: float) -> None:
        super().__init__(url, False, chunks, light=True, audio_offset=offset)
        self.sent: list[list[float]] = []  # per burst: when each chunk left
        self._msgs: list[str] = []

    async def speak(self, at: float) -> None:
        """Send every chunk on its real-time deadline from ``at`` + this client's offset, then
        END_OF_SPEECH."""
        if not self._msgs:
            self._msgs = [json.dumps({"type": "GENERATE", "session_id": self.session_id, "data": {
                "audio_chunk": {"data": base64.b64encode(c).decode(), "format": "pcm_s16le", "sample_rate": 16000,
                                "channels": 1, "duration_ms": len(c) / 32}}}) for c in self.chunks]
        times: list[float] = []
        self.sent.append(times)
        t0 = at + self.audio_offset
        for k, text in enumerate(self._msgs):
            delay = t0 + k * 0.04 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            times.append(time.monotonic())
            await self.ws.send(text)
        await self.ws.send(json.dumps({"type": "END_OF_SPEECH", "session_id": self.session_id,
                                       "data": {}}))

    def burst_frames(self) -> dict[int, list[tuple[float, int]]]:
        """Speech frames received, per burst: (time received, utterance_frame). The n-th
        utterance this client saw is its n-th burst (each burst is one utterance)."""
        order: dict[int, int] = {}
        out: dict[int, list[tuple[float, int]]] = {}
        for t, _, uid, uf in self.frames:
            if uid is None or uf is None:
                continue
            b = order.setdefault(uid, len(order))
            out.setdefault(b, []).append((t, uf))
        return out


def burst_figures(clients: list[BurstClient], b: int) -> dict[str, Any]:
    """One burst's client-side figures over every session."""
    first, early, late, worst = [], [], [], []
    for c in clients:
        sent = c.sent[b] if b < len(c.sent) else []
        frames = c.burst_frames().get(b, [])
        if not sent or not frames:
            continue
        first.append(1000 * (frames[0][0] - sent[0]))
        mine = []
        for t, uf in frames:
            if uf < len(sent):
                lat = 1000 * (t - sent[uf])
                if uf < FIRST_FRAMES:
                    early.append(lat)
                    mine.append(lat)
                elif uf >= STEADY_FROM:
                    late.append(lat)
        if mine:
            worst.append(pct(mine, 95))
    return {"sessions": len(first), "first_p50": pct(first, 50), "first_max": max(first, default=None),
            "early_p50": pct(early, 50), "early_p95": pct(early, 95),
            "early_worst": max((w for w in worst if w is not None), default=None),
            "late_p50": pct(late, 50), "late_p95": pct(late, 95)}


def _delta(a: dict[str, Any], b: dict[str, Any], key: str) -> int:
    return sum(b[s][key] - a[s][key] for s in b if s in a)


async def run(n: int, bursts: int, idle: float, gap: float) -> dict[str, Any]:
    chunks = load_chunks()
    os.environ.setdefault("MAX_PENDING_PER_IP", "0")  # every client comes from 127.0.0.1
    server = Server.on_free_port("bench-burst-speaking-", max_sessions=n + 4)
    rows: list[dict[str, Any]] = []
    try:
        server.wait_ready()
        rng = random.Random(n)
        url = f"{server.ws}/musetalk/v1/ws/bench"
        clients = [BurstClient(url, chunks, rng.uniform(0.0, 0.04)) for _ in range(n)]
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
            await asyncio.gather(*(c.start() for c in clients))
            await asyncio.sleep(idle)
            speech_s = len(chunks) * 0.04
            for _ in range(bursts):
                s0, c0 = await sessions(http), server.cpu_s()
                at = time.monotonic() + 0.2
                talk = [asyncio.create_task(c.speak(at)) for c in clients]
                await asyncio.sleep(max(0.0, at + 2.0 - time.monotonic()))
                c1, t1 = server.cpu_s(), time.monotonic()
                await asyncio.gather(*talk)
                c2, t2 = server.cpu_s(), time.monotonic()
                await asyncio.sleep(SETTLE_S)
                s1 = await sessions(http)
                health = (await http.get("/health")).json()
                rows.append({"cpu_first": (c1 - c0) / (t1 - at), "cpu_rest": (c2 - c1) / (t2 - t1),
                             "underruns": _delta(s0, s1, "underruns"),
                             "dropped": _delta(s0, s1, "dropped_frames"),
                             "speech_frames": n * round(speech_s * 25),
                             "loop_lag_p99": (health.get("event_loop_lag_ms") or {}).get("p99"),
                             "engine": health.get("engine"),
                             "gpu_standin": (health.get("engine_info") or {}).get("gpu_standin")})
                await asyncio.sleep(max(0.0, gap - SETTLE_S))
            await asyncio.gather(*(c.stop() for c in clients))
        for b, row in enumerate(rows):
            row.update(burst_figures(clients, b))
        errors = sorted({e for c in clients for e in c.errors})
    finally:
        server.stop()
    return {"n": n, "rows": rows, "errors": errors, "problems": server.log_problems()}


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def report(m: dict[str, str], res: dict[str, Any], args: argparse.Namespace) -> str:
    rows = res["rows"]
    eng = engine_label(rows[0]["engine"], rows[0]["gpu_standin"]) if rows else "engine ?"
    out = [f"## Speaking burst: {res['n']} sessions start speaking at once "
           "(`python -m bench.burst_speaking`)", "",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem']} RAM, no GPU; Python "
           f"{m['python']}, PyAV {m['av']}; {m['date']}. Speed reference: one 512x512 x264 "
           f"frame encodes in {m['x264_ms']} ms.",
           f"- The {eng}. {res['n']} sessions opened and idle for {args.idle:g} s; then "
           f"{args.bursts} bursts, {args.gap:g} s apart: every client sends one pass of the speech "
           "fixture (6.8 s, real time, then END_OF_SPEECH) from the same moment, each at a random "
           "point of one frame period after it.",
           "- Latency: chunk sent -> its frame received (client side: it includes the engine's "
           f"look-ahead); 'first 2 s': the utterance's frames 0-{FIRST_FRAMES - 1}, 'from 4 s': "
           f"frames {STEADY_FROM} on; worst session: the highest p95 over the first 2 s of one "
           "session. First frame: a session's first chunk sent -> the utterance's first frame "
           "received. Underruns and dropped frames: the server's `/sessions` counters over the "
           "burst; CPU: the server's, % of one core (the machine has "
           f"{int(m['cores']) * 100} %).", "",
           "| burst | sessions | first frame p50 / max ms | first 2 s: latency p50 / p95 / worst "
           "session's p95 ms | from 4 s: latency p50 / p95 ms | underruns | dropped "
           "| server CPU first 2 s / rest | event loop lag p99 ms (`/health`: its last 60 s) |",
           "|---:|---:|---|---|---|---|---:|---|---:|"]
    for i, r in enumerate(rows, 1):
        out.append(
            f"| {i} | {r['sessions']} | {_f(r['first_p50'])} / {_f(r['first_max'])} "
            f"| {_f(r['early_p50'])} / {_f(r['early_p95'])} / {_f(r['early_worst'])} "
            f"| {_f(r['late_p50'])} / {_f(r['late_p95'])} "
            f"| {r['underruns']} ({100 * r['underruns'] / max(1, r['speech_frames']):.1f} %) "
            f"| {r['dropped']} | {100 * r['cpu_first']:.0f} % / {100 * r['cpu_rest']:.0f} % "
            f"| {_f(r['loop_lag_p99'], '{:.1f}')} |")
    problems = res["problems"]
    out += ["", f"Client errors: {', '.join(res['errors']) or 'none'}. Server log: "
            f"{len(problems)} warning/error lines" + (":" if problems else "."),
            *[f"  - `{p[:200]}`" for p in problems[:8]], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--idle", type=float, default=3.0, help="seconds idle after opening")
    ap.add_argument("--gap", type=float, default=3.0, help="seconds idle between bursts")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_burst_speaking.md"))
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.bursts < 1:
        ap.error("--sessions and --bursts must be at least 1")
    m = machine()
    publish(report(m, asyncio.run(run(args.sessions, args.bursts, args.idle, args.gap)), args),
            args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
