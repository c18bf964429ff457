"""Benchmark a MuseTalk speech frame's picture on one core: blend, conversion, frame for aiortc.

    python -m bench.bench_blend [--out docs/bench_blend.md] [--rounds 15]

On the built-in avatar (512x512) prepared by the GPU stand-in (its masks and boxes; no
weights), with the reference crops as the faces, ms per frame (median over ``--rounds``
passes over every frame of the idle clip, ``time.thread_time``, cv2.setNumThreads(1)):

* what the encoder is handed: the RGB blend then the whole frame converted to I420 (before
  December 7, and still for a frame whose base is not kept in I420: past ``BaseI420``'s
  budget, or crossfaded), against ``blend_i420`` from the base frame's kept I420 copy;
* what a WebRTC track hands aiortc, whose encoders take yuv420p: an rgb24 ``VideoFrame``
  reformatted to yuv420p, against the I420 picture's frame.

Ratios are old / new. Results differ from run to run on a shared machine: compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from bench.bench_engine import cpu_model
from websocket_service.avatars.model import BaseFrame
from websocket_service.avatars.store import build_avatar
from websocket_service.config import Settings
from websocket_service.engines.musetalk.engine import MuseTalkEngine
from websocket_service.engines.musetalk.stream import BaseI420, blend, blend_i420, mask_rect
from websocket_service.media.encoder import video_frame

SIZE = 512


def per_frame_ms(fn: Callable[[int], object], n: int, rounds: int) -> float:
    for i in range(n):  # warm
        fn(i)
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for i in range(n):
            fn(i)
        times.append((time.thread_time() - t0) / n * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    engine = MuseTalkEngine(Settings(_env_file=None, engine="musetalk", model_path=Path("/none"),
                                     device="cpu", gpu_standin="h100", musetalk_process=False))
    engine.load()
    try:
        avatar = build_avatar("bench", [data.astronaut()], True, SIZE, SIZE)
        engine.prepare_avatar(avatar)
    finally:
        asyncio.run(engine.aclose())
    clip = avatar.clip("idle")
    cd = avatar.engine_data["musetalk"]["clips"]["idle"]
    n = len(clip)
    bases = [BaseFrame("idle", i, clip.frames[i]) for i in range(n)]
    boxes = [tuple(int(v) for v in b) for b in cd.boxes]
    faces = [cv2.resize(clip.frames[i][y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_AREA)
             for i, (x1, y1, x2, y2) in enumerate(boxes)]
    rects = [mask_rect(m) for m in cd.masks]
    cache = BaseI420(avatar)
    kept = [cache.get(b) for b in bases]

    def rgb_then_convert(i: int) -> np.ndarray:
        img = blend(clip.frames[i], faces[i], cd.boxes[i], cd.masks[i], rects[i])
        return cv2.cvtColor(img, cv2.COLOR_RGB2YUV_I420)

    def into_i420(i: int) -> np.ndarray:
        base = cache.get(bases[i])
        assert base is not None
        return blend_i420(base, clip.frames[i], faces[i], cd.boxes[i], cd.masks[i], rects[i])

    assert all(k is not None for k in kept)
    for i in range(n):  # the same bytes, or the comparison means nothing
        assert np.array_equal(rgb_then_convert(i), into_i420(i))
    rgb_pictures = [blend(clip.frames[i], faces[i], cd.boxes[i], cd.masks[i], rects[i])
                    for i in range(n)]
    i420_pictures = [into_i420(i) for i in range(n)]

    old = per_frame_ms(rgb_then_convert, n, args.rounds)
    new = per_frame_ms(into_i420, n, args.rounds)
    rtc_old = per_frame_ms(lambda i: video_frame(rgb_pictures[i]).reformat(format="yuv420p"),
                           n, args.rounds)
    rtc_new = per_frame_ms(lambda i: video_frame(i420_pictures[i]).reformat(format="yuv420p"),
                           n, args.rounds)
    lines = [
        "# A MuseTalk speech frame's picture (`bench/bench_blend.py`)",
        "",
        f"Machine: {cpu_model()}; one thread (cv2.setNumThreads(1)); {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Built-in avatar {SIZE}x{SIZE}, {n} idle frames, GPU stand-in's masks and boxes; "
        f"median of {args.rounds} passes, ms per frame.",
        "",
        "| what | before (RGB) | now (I420) | before / now |",
        "| --- | --- | --- | --- |",
        f"| blend + picture for the encoder (base kept in I420) | {old:.3f} | {new:.3f} | {old / new:.2f} |",
        f"| frame for aiortc (its encoders take yuv420p) | {rtc_old:.3f} | {rtc_new:.3f} | {rtc_old / rtc_new:.1f} |",
        "",
        "Both give the same I420 bytes (checked on every frame before timing). A frame whose "
        "base is not kept in I420 (past `BaseI420`'s budget, or crossfaded) takes the RGB path: "
        "converting its base and then the blend's rectangle cost more than that.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
