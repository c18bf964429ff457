"""Measure the demo page in headless Chromium and write docs/bench_webrtc.md.

Usage: python bench/bench_browser.py [--runs 3] [--out docs/bench_webrtc.md]

For each transport and run: open the page, click Connect, read the page's own counters
(window.__stats): time to first frame (TTFF), decoded fps over 3 s, then click "Speak
sample" and collect the glass-to-glass latencies the page measures (see the methods
section of the report).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test.browser import chromium  # noqa: E402
from test.live_server import live_server  # noqa: E402
from websocket_service.config import Settings  # noqa: E402

COUNTER = {"webrtc": "webrtcFramesDecoded", "ws": "wsFramesDecoded"}


def one_run(browser: Any, url: str, transport: str) -> dict[str, Any]:
    page = browser.new_page()
    page.goto(url + "/")
    page.check(f"input[name=transport][value={transport}]")
    page.click("#connect")
    page.wait_for_function("window.__stats.ttffMs !== null", timeout=20_000)
    counter = COUNTER[transport]
    page.wait_for_function(f"window.__stats.{counter} > 10", timeout=20_000)
    f0, t0 = page.evaluate(f"window.__stats.{counter}"), time.monotonic()
    time.sleep(3.0)
    f1, t1 = page.evaluate(f"window.__stats.{counter}"), time.monotonic()
    page.click("#speak")
    time.sleep(8.0)  # the 6.8 s sample plus the tail
    st = page.evaluate("window.__stats")
    page.click("#disconnect")
    page.close()
    return {"ttff": st["ttffMs"], "fps": (f1 - f0) / (t1 - t0), "g2g": list(st["g2gMs"])}


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                  if ln.startswith("Model name")), platform.processor())
    return f"{model}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores"


def _chromium_version() -> str:
    out = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.stdout else "chromium"


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "–"
    q = statistics.quantiles(xs, n=20) if len(xs) > 1 else [xs[0]] * 19
    return f"{statistics.median(xs):.0f} (p95 {q[18]:.0f}, n={len(xs)})"


def report(results: dict[str, list[dict[str, Any]]], runs: int) -> str:
    lines = [
        "# WebRTC and WebSocket demo page: browser benchmark",
        "",
        f"Machine: {_cpu()}, no GPU. Browser: {_chromium_version()}, headless, software "
        "decoding. Server: this repository's app (geometric CPU engine, 512x512, 25 fps) on "
        "127.0.0.1 in the same process as the benchmark driver.",
        f"Made by `bench/bench_browser.py` ({runs} runs per transport).",
        "",
        "| transport | TTFF ms, median (runs) | decoded fps | glass-to-glass ms, median (p95, n) |",
        "|---|---|---|---|",
    ]
    names = {"webrtc": "WebRTC (aiortc → Chromium)", "ws": "WebSocket + WebCodecs"}
    for t, rs in results.items():
        ttff = [r["ttff"] for r in rs]
        fps = [r["fps"] for r in rs]
        g2g = [x for r in rs for x in r["g2g"]]
        lines.append(f"| {names[t]} | {statistics.median(ttff):.0f} ({', '.join(f'{x:.0f}' for x in ttff)}) "
                     f"| {statistics.mean(fps):.1f} | {_fmt(g2g)} |")
    lines += [
        "",
        "## Methods",
        "",
        "* **TTFF**: `performance.now()` at the Connect click to the first decoded frame: the",
        "  first `VideoDecoder` output drawn to the canvas (WebSocket), or the first",
        "  `requestVideoFrameCallback` of the `<video>` element (WebRTC). It includes the",
        "  session start, signaling (WebRTC: ICE gathering, DTLS, first keyframe, jitter buffer).",
        "* **Decoded fps**: growth of the page's decoded-frame counter over 3 s (WebRTC:",
        "  `inbound-rtp.framesDecoded` from `pc.getStats()`, polled every 0.5 s).",
        "* **Glass-to-glass, WebSocket**: the page streams the 6.8 s sample in real time as",
        "  40 ms `GENERATE` chunks; for every drawn frame of that utterance with",
        "  `utterance_frame = k` it records draw time minus the send time of chunk k (the chunk",
        "  whose audio that frame lip-syncs). One sample per speech frame.",
        "* **Glass-to-glass, WebRTC**: the page plays the sample into its audio sender (Web",
        "  Audio → `MediaStreamAudioDestinationNode` → `replaceTrack`). t0 = the moment the",
        "  first loud 20 ms block of the sample is played into the track; t1 = the first video",
        "  frame presented (`requestVideoFrameCallback`) whose `receiveTime` is after the",
        "  server's `STATE_CHANGED → speaking` arrived on the signaling socket. It includes",
        "  Opus encode/decode, the server's energy gate, rendering, H.264 encode, RTP, the",
        "  jitter buffer and decode; it can be late by up to one frame (40 ms) because the",
        "  speaking state is matched by arrival time, not by frame index. One sample per run.",
        "* Audio playout (`AudioContext.outputLatency`) is not included in either number.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_webrtc.md")
    args = ap.parse_args()
    settings = Settings(avatars_dir=Path(tempfile.mkdtemp(prefix="bench-avatars-")),
                        rtc_host_addresses=["127.0.0.1"])
    results: dict[str, list[dict[str, Any]]] = {"webrtc": [], "ws": []}
    with live_server(settings) as url, chromium() as browser:
        for _ in range(args.runs):
            for t in results:
                r = one_run(browser, url, t)
                print(t, f"ttff={r['ttff']} fps={r['fps']:.1f} g2g_n={len(r['g2g'])}", flush=True)
                results[t].append(r)
    text = report(results, args.runs)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
