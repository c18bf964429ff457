"""MuseTalk engine benchmark: frames/s vs batch size, sessions per device, streaming latency,
and the drift of streamed audio features against whole-clip features.

Random weights, real architecture sizes (UNet from MUSETALK.md, sd-vae-ft-mse VAE, whisper-tiny
encoder); nothing is downloaded. ``--tiny`` uses the test suite's scaled-down model (CPU smoke).

    python bench/bench_musetalk.py --tiny                    # CPU smoke, a minute or two
    python bench/bench_musetalk.py --device cuda             # full size, fp16 on CUDA
    python bench/bench_musetalk.py --model-path models       # real weights (drift is meaningful)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "test")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.run_stream import read_wav  # noqa: E402
from websocket_service.avatars.model import Avatar, BaseFrame, Clip, ClipKind  # noqa: E402
from websocket_service.config import Settings  # noqa: E402
from websocket_service.engines.musetalk import MuseTalkEngine  # noqa: E402
from websocket_service.engines.musetalk.audio import (  # noqa: E402
    WHISPER_HOP,
    LogMel,
    WhisperStates,
    fixed_window,
    fixed_window_samples,
    frame_window,
    positional_encoding,
)
from websocket_service.engines.musetalk.loader import load_bundle, make_bundle  # noqa: E402

UNET = dict(in_channels=8, out_channels=4, sample_size=64, block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=384,
            attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            flip_sin_to_cos=True, freq_shift=0)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
WHISPER = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
               decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536, num_mel_bins=80,
               max_source_positions=1500, vocab_size=51865)


def full_bundle(device: str, fp16: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    wcfg = WhisperConfig(**WHISPER)
    return make_bundle(UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), WhisperEncoder(wcfg),
                       wcfg, WhisperFeatureExtractor(feature_size=80), None, device, fp16, {})


def machine(bundle) -> str:
    if bundle.device.type == "cuda":
        name = torch.cuda.get_device_name(bundle.device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} threads"
    return f"{name}, torch {torch.__version__}, {str(bundle.dtype).replace('torch.', '')}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fps_by_batch(engine: MuseTalkEngine, sizes: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """UNet + decoder per batch size, eager (``bench/bench_gpu_path.py`` measures the graphs)."""
    from websocket_service.engines.musetalk.decoder import make_generate
    from websocket_service.engines.musetalk.graphs import BucketRunner

    b = engine.bundle
    h = 256 // 2 ** (len(b.vae.config.block_out_channels) - 1)
    d = b.whisper_config.d_model
    pe = positional_encoding(50, d).to(b.device, b.dtype)
    gen = make_generate(b.unet, b.vae, pe, float(b.vae.config.scaling_factor))
    rows = []
    for size in sizes:
        run = BucketRunner(gen, ((8, h, h), (50, d)), b.device, b.dtype, "eager", (size,))
        run.warm_up()
        lat = torch.randn(size, 8, h, h).to(b.device, b.dtype)
        aud = torch.randn(size, 50, d).to(b.device, b.dtype)
        run.run(lat, aud)  # warm-up
        sync(b.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            run.run(lat, aud)
        sync(b.device)
        dt = (time.perf_counter() - t0) / repeats
        rows.append((size, size / dt, 1000 * dt))
        print(f"batch {size:3d}: {size / dt:8.1f} frames/s ({1000 * dt:.1f} ms/batch)", flush=True)
    return rows


def bench_avatar(engine: MuseTalkEngine, frames: int = 4) -> Avatar:
    from skimage import data

    from websocket_service.avatars.store import build_avatar

    av = build_avatar("bench", [data.astronaut()], True, 512, 512)
    av.clips = {"idle": Clip("idle", ClipKind.BASE, av.clip("idle").frames[:frames].copy())}
    engine.prepare_avatar(av)
    return av


async def stream_latency(engine: MuseTalkEngine, avatar: Avatar, sessions: int, seconds: float,
                         pcm: np.ndarray) -> dict[str, float]:
    """``sessions`` streams fed 40 ms of audio every 40 ms; latency = frame out - audio in."""
    lat: list[float] = []
    n_frames = int(seconds * 25)
    clip = avatar.clip("idle")

    async def one(k: int) -> int:
        stream = engine.open_stream(avatar)
        got = 0
        counter = iter(range(10**9))

        def take() -> BaseFrame:
            i = next(counter) % len(clip)
            return BaseFrame("idle", i, clip.frames[i])

        async def feed() -> None:
            t0 = time.monotonic()
            for n in range(n_frames):
                stream.push_audio(pcm[(n * 640 + k * 3200) % (len(pcm) - 640):][:640])
                await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.04 - time.monotonic()))
            stream.end_segment()

        feeder = asyncio.create_task(feed())
        while got < n_frames:
            frames = await stream.render_next(take, 8)
            now = time.monotonic()
            lat.extend(now - f.audio_arrival for f in frames)
            got += len(frames)
        await feeder
        return got

    t0 = time.monotonic()
    await asyncio.gather(*(one(k) for k in range(sessions)))
    wall = time.monotonic() - t0
    ms = np.array(lat) * 1000
    return {"sessions": sessions, "frames": len(lat), "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "fps_out": len(lat) / wall}


def feature_drift(engine: MuseTalkEngine, pcm: np.ndarray, mode: str, context_ms: int,
                  hop: int, every: int = 1) -> tuple[float, float]:
    """Streamed features (hop groups, real-time arrival) vs whole-clip 30 s window features."""
    b = engine.bundle
    fe = b.feature_extractor
    logmel = LogMel(fe.mel_filters, fe.n_fft, fe.hop_length, fe.n_samples, b.device)
    whole = WhisperStates(b.encoder, logmel, "full")
    part = WhisperStates(b.encoder, logmel, mode)
    n_frames = len(pcm) // 640
    pcm = pcm[: n_frames * 640]
    n_valid = len(pcm) // WHISPER_HOP
    errs, coss = [], []
    with torch.inference_mode():
        ref_states = whole(pcm)
        for n0 in range(0, n_frames, hop * every):
            idx = list(range(n0, min(n_frames, n0 + hop)))
            need = (idx[-1] + 4) * 640
            ended = need >= len(pcm)
            start, end = fixed_window(idx[-1], min(need, len(pcm)), ended,
                                      fixed_window_samples(context_ms * 16, hop, fe.n_samples))
            win = np.zeros(end - start, np.int16)  # zeros before 0 and after the end
            lo, hi = max(start, 0), min(end, len(pcm))
            win[lo - start: hi - start] = pcm[lo:hi]
            states = part(win)
            for f in idx:
                a = frame_window(states, f, start // WHISPER_HOP, n_valid if ended else None)
                r = frame_window(ref_states, f, 0, n_valid)
                errs.append(float((a - r).norm() / r.norm().clamp(min=1e-6)))
                coss.append(float(torch.nn.functional.cosine_similarity(a.flatten(), r.flatten(), 0)))
    return float(np.mean(errs)), float(np.mean(coss))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="scaled-down model (CPU smoke)")
    ap.add_argument("--model-path", type=Path, help="real weights in the official layout")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sessions", default="1,4,12")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_musetalk.md")
    args = ap.parse_args()

    if args.model_path:
        bundle, label = load_bundle(args.model_path, "v15", args.device, not args.no_fp16), "real weights"
    elif args.tiny:
        from musetalk_tiny import write_tiny_model

        tmp = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
        bundle, label = load_bundle(tmp, "v15", args.device, not args.no_fp16), "tiny (test model)"
    else:
        bundle, label = full_bundle(args.device, not args.no_fp16), "full size, random weights"
    sizes = [int(x) for x in args.batches.split(",")]
    settings = Settings(_env_file=None, engine="musetalk", batch_max=max(sizes), batch_wait_ms=5)
    engine = MuseTalkEngine(settings)
    engine.attach(bundle)
    print(f"{label} on {machine(bundle)}", flush=True)

    rows = fps_by_batch(engine, sizes, args.repeats)
    best = max(r[1] for r in rows)
    avatar = bench_avatar(engine)
    pcm = read_wav(ROOT / "fixtures" / "speech_pauses_16k.wav")
    lat_rows = []
    for s in (int(x) for x in args.sessions.split(",")):
        r = asyncio.run(stream_latency(engine, avatar, s, args.seconds, pcm))
        print(f"{s} sessions: p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, "
              f"{r['fps_out']:.1f} frames/s out", flush=True)
        lat_rows.append(r)
    # a 30 s window per hop is slow on a CPU: there, sample every 8th hop of the full mode
    every = 1 if engine.bundle.device.type == "cuda" else 8
    drift = [("short", ctx, *feature_drift(engine, pcm, "short", ctx, engine.hop))
             for ctx in (0, 500, 1000, 2000)]
    drift += [("full", ctx, *feature_drift(engine, pcm, "full", ctx, engine.hop, every))
              for ctx in (1000,)]
    for d in drift:
        print(f"drift {d[0]} ctx {d[1]} ms: rel err {d[2]:.4f}, cos {d[3]:.4f}", flush=True)
    asyncio.run(engine.aclose())
    write_doc(args.out, label, machine(bundle), rows, best, lat_rows, drift, engine)


HEADER = """# MuseTalk engine benchmark

Written by `bench/bench_musetalk.py`; each run replaces its own section below.
"""


def write_doc(path: Path, label, mach, rows, best, lat_rows, drift, engine) -> None:
    lines = [f"## {label}: {mach}", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M')} with `bench/bench_musetalk.py`; hop "
             f"{engine.hop} frames, look-ahead {40 * engine.lookahead_frames} ms.", "",
             "| batch | frames/s | ms/batch |", "| ---: | ---: | ---: |"]
    lines += [f"| {b} | {f:.1f} | {ms:.1f} |" for b, f, ms in rows]
    lines += ["", f"Best {best:.1f} frames/s = **{best / 25:.1f} concurrent 25 fps sessions** "
              "(compute only).", "",
              "| sessions (real-time audio) | frames | p50 audio-in -> frame-out | p95 | frames/s out |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['sessions']} | {r['frames']} | {r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms | "
              f"{r['fps_out']:.1f} |" for r in lat_rows]
    lines += ["", "Feature drift, streamed windows vs whole-clip 30 s features (mean over frames; "
              "`fixtures/speech_pauses_16k.wav`):", "",
              "| encoder window | left context | relative L2 error | cosine |",
              "| --- | ---: | ---: | ---: |"]
    lines += [f"| {m} | {c} ms | {e:.4f} | {cs:.4f} |" for m, c, e, cs in drift]
    begin, end = f"<!-- run: {label} -->", f"<!-- end: {label} -->"
    section = "\n".join([begin, *lines, end]) + "\n"
    old = path.read_text() if path.exists() else HEADER
    if begin in old and end in old:
        old = old[: old.index(begin)] + old[old.index(end) + len(end) + 1:]
    path.write_text(old.rstrip() + "\n\n" + section)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
