"""Encode throughput with in-process encoders vs the encoder process pool, under GIL load.

    python bench/bench_encoder_pool.py [--streams 8] [--frames 50] [--processes 2]

Each of ``--streams`` encoders encodes ``--frames`` 512x512 frames (a moving pattern with
noise), all concurrently from one event loop, while a thread runs pure-Python work (standing in
for the engine's rendering, which needs the GIL). Reports encoded frames/s and how much of the
Python work got done meanwhile, for ``encoder_processes=0`` and for the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import numpy as np

from websocket_service.media.encoder_pool import EncoderPool, open_encoder

SIZE = 512


def make_frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = [np.dstack([(x + 4 * i) % 256, (y + 2 * i) % 256, (x + y) % 256]) for i in range(n)]
    return [(b + rng.integers(0, 24, b.shape)).clip(0, 255).astype(np.uint8) for b in base]


def python_work(stop: threading.Event, counter: list[int]) -> None:
    while not stop.is_set():
        sum(i * i for i in range(2000))  # holds the GIL like rendering glue does
        counter[0] += 1


async def run(pool: EncoderPool | None, streams: int, frames: list[np.ndarray]) -> tuple[float, int]:
    encoders = [await open_encoder(pool, SIZE, SIZE, 25, 1_000_000, 25) for _ in range(streams)]

    async def one(enc) -> None:  # noqa: ANN001 - either encoder kind
        for f in frames:
            await enc.encode(f)

    stop, counter = threading.Event(), [0]
    worker = threading.Thread(target=python_work, args=(stop, counter))
    worker.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(e) for e in encoders))
    wall = time.perf_counter() - t0
    stop.set()
    worker.join()
    for e in encoders:
        await e.close()
    return streams * len(frames) / wall, round(counter[0] / wall)


async def amain(args: argparse.Namespace) -> None:
    frames = make_frames(args.frames)
    fps0, work0 = await run(None, args.streams, frames)
    print(f"in-process:      {fps0:6.1f} frames/s encoded, python work {work0}/s")
    pool = EncoderPool(args.processes)
    await pool.start()
    try:
        fps1, work1 = await run(pool, args.streams, frames)
    finally:
        await pool.aclose()
    print(f"pool ({args.processes} procs): {fps1:6.1f} frames/s encoded, python work {work1}/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--processes", type=int, default=2)
    asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    main()
