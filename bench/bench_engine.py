"""Benchmark the geometric engine on one core: ms per 512x512 frame, lip-sync quality.

    python -m bench.bench_engine [--out docs/bench_engine.md]

Measures (cv2.setNumThreads(1), one thread): render only, and render + H.264 encode (PyAV
libx264, preset ultrafast, tune zerolatency), p50/p95 over the speech fixture's frames;
r and the silence ratio from bench/mouth_metrics.py; and an estimate of concurrent speaking
sessions at 25 fps on this machine's cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from bench.mouth_metrics import evaluate
from bench.run_stream import base_cycle, read_wav, speak
from websocket_service.avatars.store import AvatarStore
from websocket_service.config import Settings
from websocket_service.engines.geometric import GeometricEngine
from websocket_service.engines.geometric.fields import MouthPose

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "fixtures" / "speech_pauses_16k.wav"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def encoder(width: int, height: int):
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.framerate = 25
    codec.options = {"preset": "ultrafast", "tune": "zerolatency"}
    codec.thread_count = 1  # single core, like the render
    return codec


def time_frames(engine, avatar, poses, encode: bool) -> np.ndarray:
    """Per-frame ms of render (+ encode), rendering each pose on the idle loop."""
    take = base_cycle(avatar)
    codec = encoder(avatar.width, avatar.height) if encode else None
    times = []
    for pose in poses:
        base = take()
        t0 = time.perf_counter()
        image = engine.render(avatar, base, pose)
        if codec is not None:
            codec.encode(av.VideoFrame.from_ndarray(image, format="rgb24"))
        times.append((time.perf_counter() - t0) * 1000)
    return np.array(times)


def run(avatars_dir: Path) -> tuple[str, dict]:
    cv2.setNumThreads(1)
    engine = GeometricEngine(Settings())
    avatar = AvatarStore(avatars_dir, 512, 512, 25, engine.prepare_avatar).ensure_builtin("default")
    pcm = read_wav(SPEECH)
    frames = speak(engine, avatar, pcm)
    quality = evaluate([f.image for f in frames], pcm, avatar.meta["face_box"],
                       [f.base.image for f in frames])
    poses = [MouthPose(f.info["open"], f.info["shape"]) for f in frames]
    speaking = [p for p in poses if p.opening > 0]
    time_frames(engine, avatar, speaking[:20], encode=True)  # warm caches and the encoder
    render = time_frames(engine, avatar, speaking * 2, encode=False)
    full = time_frames(engine, avatar, speaking * 2, encode=True)
    cores = os.cpu_count() or 1
    nums = {
        "render_p50": float(np.percentile(render, 50)), "render_p95": float(np.percentile(render, 95)),
        "full_p50": float(np.percentile(full, 50)), "full_p95": float(np.percentile(full, 95)),
        "r": quality["r"], "silence_ratio": quality["silence_ratio"], "cores": cores,
        "frames": len(speaking) * 2,
    }
    # each speaking session needs 25 frames/s of render+encode; keep 30 % headroom
    nums["sessions"] = int(cores * 1000.0 / (25.0 * nums["full_p50"]) * 0.7)
    return table(nums), nums


def table(n: dict) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([
        "## Geometric engine (weight-free, CPU)",
        "",
        f"Machine: {cpu_model()}, {n['cores']} cores; one thread (cv2.setNumThreads(1)); "
        f"512x512 frames of the built-in avatar, speaking poses of "
        f"`fixtures/speech_pauses_16k.wav` ({n['frames']} frames); 1-min load average "
        f"during the run {load:.1f}.",
        "",
        "| measure | p50 | p95 |",
        "|---|---|---|",
        f"| render (ms/frame) | {n['render_p50']:.2f} | {n['render_p95']:.2f} |",
        f"| render + H.264 encode, libx264 ultrafast/zerolatency (ms/frame) | "
        f"{n['full_p50']:.2f} | {n['full_p95']:.2f} |",
        "",
        "| lip-sync quality (bench/mouth_metrics.py, from output frames) | value | aim |",
        "|---|---|---|",
        f"| Pearson r, mouth darkness vs loudness per 40 ms | {n['r']:.3f} | >= 0.6 |",
        f"| mouth activity in silence / in speech | {n['silence_ratio']:.3f} | < 0.2 |",
        "",
        f"Estimated concurrent speaking sessions at 25 fps: **{n['sessions']}** "
        f"({n['cores']} cores x 1000 ms / (25 x {n['full_p50']:.2f} ms render+encode p50), "
        "with 30 % headroom for audio, WebSocket/WebRTC I/O and the event loop).",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_engine.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text, _ = run(Path(tmp))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
