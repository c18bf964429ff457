"""MuseTalk GPU path benchmark (issue 21): per-bucket graphs of UNet + decoder, SD-VAE vs TAESD.

Random full-size weights built in memory (UNet from shared/MUSETALK.md, sd-vae-ft-mse's VAE,
TAESD = diffusers AutoencoderTiny's default config), fp16 on CUDA; nothing is downloaded.

    python bench/bench_gpu_path.py                       # on a GPU: one command, < 7 min on an H100
    python bench/bench_gpu_path.py --tiny --device cpu   # CPU smoke: the test suite's tiny model

Per decoder and bucket: capture time and median time of a batch through ``BucketRunner`` in
cuda-graph mode (CUDA events around the whole call: input copies, replay, copy-out to pinned
memory), the same in eager mode, and the largest graph-vs-eager difference (uint8 levels). Then
CUDA graphs over inductor-compiled kernels at batch 32 (``compile_kernels``: what 400 frames/s
with the SD-VAE needs), and compile mode (one ``torch.compile(dynamic=False)`` per bucket) for
buckets 1 and 8: compiles per bucket and dynamic-shape compiles (expected 1 and 0) after runs of
every size. The compile stages are time-boxed (``--budget-s``).
Frames/s at batch 32 against the issue's goals (SD-VAE >= 400, TAESD >= 800). Streaming
1/16/24/32 sessions through the engine (:func:`stream_sessions`: the UNet per bucket, then the
decoder in chunks of ``MUSETALK_DECODE_CHUNK``, 8 by default), within the time box.

Writes ``--json`` (default bench/results/gpu_path.json) after every stage (``"complete": false``
until the last: a run cut off at a device call's time limit keeps what it measured) and, only
on CUDA, the GPU section of
docs/bench_musetalk.md between ``<!-- gpu-path:start -->`` and ``<!-- gpu-path:end -->``. On a
CPU the graph mode is compile mode with torch.compile's "eager" backend (no CUDA graphs there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "test")]

import torch  # noqa: E402

from bench.bench_musetalk import UNET, VAE  # noqa: E402 - the full-size configs

LATENT = (8, 32, 32)
AUDIO = (50, 384)
GOALS = {"sd-vae": 400.0, "taesd": 800.0}  # frames/s at batch 32 on one H100 (issue 21)
START, END = "<!-- gpu-path:start -->", "<!-- gpu-path:end -->"
#: the astronaut's face (x, y, w, h), as OpenCV 4's frontal-face cascade finds it
ASTRONAUT_FACE = (177, 67, 93, 93)
TINY_TAESD = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))


@dataclass
class Models:
    unet: Any
    decoders: dict[str, Any]  # "sd-vae" -> AutoencoderKL, "taesd" -> AutoencoderTiny
    pe: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    label: str
    whisper: Any = None  # the Whisper encoder (streaming), its config and feature extractor
    whisper_config: Any = None
    feature_extractor: Any = None


def build_models(tiny: bool, device: torch.device, fp16: bool) -> Models:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    from websocket_service.engines.musetalk.audio import positional_encoding

    dtype = torch.float16 if (fp16 and device.type == "cuda") else torch.float32
    torch.manual_seed(0)
    if tiny:
        from musetalk_tiny import write_tiny_model

        from websocket_service.engines.musetalk.loader import load_bundle

        bundle = load_bundle(write_tiny_model(Path(tempfile.mkdtemp()) / "tiny"), "v15",
                             str(device), fp16)
        unet, vae, taesd = bundle.unet, bundle.vae, AutoencoderTiny(**TINY_TAESD)
        encoder, wcfg, fe = bundle.encoder, bundle.whisper_config, bundle.feature_extractor
        label = "tiny (test model)"
    else:
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        wcfg = WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                             encoder_ffn_dim=1536, num_mel_bins=80)  # whisper-tiny's encoder
        fe = WhisperFeatureExtractor(feature_size=80)
        with torch.device(device):  # random init on the device: seconds instead of a minute
            unet, vae, taesd = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), AutoencoderTiny()
            encoder = WhisperEncoder(wcfg)
        label = "full size, random weights"
    for m in (unet, vae, taesd, encoder):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Models(unet, {"sd-vae": vae, "taesd": taesd}, positional_encoding(*AUDIO), device,
                  dtype, label, encoder, wcfg, fe)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def runner(models: Models, decoder: str, mode: str, buckets: tuple[int, ...], backend: str,
           compile_kernels: bool = False):
    from websocket_service.engines.musetalk.decoder import decoder_scale, make_generate
    from websocket_service.engines.musetalk.graphs import BucketRunner

    dec = models.decoders[decoder]
    fn = make_generate(models.unet, dec, models.pe, decoder_scale(dec))
    return BucketRunner(fn, (LATENT, AUDIO), models.device, models.dtype, mode=mode,
                        buckets=buckets, compile_backend=backend, compile_kernels=compile_kernels)


def random_inputs(models: Models, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, *LATENT), generator=g).to(models.device, models.dtype),
            torch.randn((n, *AUDIO), generator=g).to(models.device, models.dtype))


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def bench_graphs(models: Models, decoder: str, mode: str, buckets: tuple[int, ...],
                 repeats: int, backend: str) -> dict[str, Any]:
    """Graph mode vs eager per bucket for one decoder."""
    graph = runner(models, decoder, mode, buckets, backend)
    capture = graph.warm_up()
    graph_s = graph.measure(repeats)
    eager = runner(models, decoder, "eager", buckets, backend)
    eager.warm_up()
    eager_s = eager.measure(repeats)
    rows = []
    for b in buckets:
        lat, aud = random_inputs(models, b, seed=b)
        diff = int(abs(graph.run(lat, aud).astype(int) - eager.run(lat, aud).astype(int)).max())
        rows.append({"bucket": b, "capture_s": round(capture[b], 3),
                     "graph_ms": round(1000 * graph_s[b], 3), "eager_ms": round(1000 * eager_s[b], 3),
                     "graph_fps": round(b / graph_s[b], 1), "eager_fps": round(b / eager_s[b], 1),
                     "max_abs_diff": diff})
        print(f"{decoder:6s} {mode} b{b:<3d} capture {capture[b]:7.2f} s  graph "
              f"{1000 * graph_s[b]:8.2f} ms  eager {1000 * eager_s[b]:8.2f} ms  "
              f"{b / graph_s[b]:7.1f} fps  diff {diff}", flush=True)
    out = {"mode": graph.mode, "rows": rows, "counts": graph.compile_counts}
    del graph, eager
    free(models.device)
    return out


def bench_compile(models: Models, decoder: str, buckets: tuple[int, ...], repeats: int,
                  backend: str) -> dict[str, Any]:
    """Compile mode: one static graph per bucket, none dynamic, after runs of every size."""
    r = runner(models, decoder, "compile", buckets, backend)
    t0 = time.perf_counter()
    compile_s = r.warm_up()
    for n in range(1, r.max_batch + 1):
        r.run(*random_inputs(models, n, seed=1000 + n))
    times = r.measure(repeats)
    ok = (all(c == 1 for c in r.compile_counts.values())
          and not any(r.dynamic_counts.values()))
    out = {"decoder": decoder, "backend": backend, "compile_mode": r.compile_mode,
           "buckets": list(buckets), "compile_s": {b: round(s, 1) for b, s in compile_s.items()},
           "compile_counts": r.compile_counts, "dynamic_counts": r.dynamic_counts,
           "ms": {b: round(1000 * s, 3) for b, s in times.items()}, "one_static_graph_each": ok,
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"compile {decoder}: counts {r.compile_counts} dynamic {r.dynamic_counts} "
          f"compile_s {out['compile_s']} ms {out['ms']}", flush=True)
    del r
    free(models.device)
    return out


def bench_fused(models: Models, decoder: str, buckets: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """CUDA only: each bucket's CUDA graph captures inductor-compiled kernels (``compile_kernels``),
    the combination the 400 frames/s goal needs (graphed UNet + compiled SD-VAE)."""
    r = runner(models, decoder, "cuda-graph", buckets, "inductor", compile_kernels=True)
    capture = r.warm_up()
    times = r.measure(repeats)
    eager = runner(models, decoder, "eager", buckets, "inductor")
    diffs = {}
    for b in buckets:
        lat, aud = random_inputs(models, b, seed=b)
        diffs[b] = int(abs(r.run(lat, aud).astype(int) - eager.run(lat, aud).astype(int)).max())
    out = {"decoder": decoder, "buckets": list(buckets),
           "capture_s": {b: round(s, 1) for b, s in capture.items()},
           "ms": {b: round(1000 * s, 3) for b, s in times.items()},
           "fps": {b: round(b / s, 1) for b, s in times.items()}, "max_abs_diff": diffs,
           "compile_counts": r.compile_counts, "dynamic_counts": r.dynamic_counts}
    print(f"fused {decoder}: {out}", flush=True)
    del r, eager
    free(models.device)
    return out


def stream_sessions(models: Models, decoder: str, sessions: int, seconds: float) -> dict[str, Any]:
    """``sessions`` streams speaking at once through the MuseTalk engine (the inference core:
    batched Whisper, deadline scheduler, one captured graph per bucket, blending), each fed
    40 ms of audio every 40 ms for ``seconds`` after a 3 s warm-up. The core runs on a thread of
    this process (the models are built in memory here; the server runs it in its own process).
    Audio-in (a frame's last needed sample) to blended frame out, per frame; frames/s per
    session; the core's counters."""
    import asyncio

    import numpy as np
    from skimage import data as skdata

    from websocket_service.avatars.model import BaseFrame
    from websocket_service.avatars.store import build_avatar
    from websocket_service.config import Settings
    from websocket_service.engines.musetalk import MuseTalkEngine
    from websocket_service.engines.musetalk.loader import Bundle

    root = Path(tempfile.mkdtemp(prefix="gpu-path-"))
    models.decoders["taesd"].save_pretrained(root / "taesd")  # the core loads it from MODEL_PATH
    settings = Settings(_env_file=None, engine="musetalk", device=str(models.device),
                        model_path=root, musetalk_decoder=decoder, batch_max=32,
                        musetalk_max_streams=sessions, musetalk_process=False)
    engine = MuseTalkEngine(settings)
    bundle = Bundle(models.unet, models.decoders["sd-vae"], models.whisper, models.whisper_config,
                    models.feature_extractor, None, models.device, models.dtype)
    t0 = time.perf_counter()
    engine.attach(bundle)
    startup = time.perf_counter() - t0
    # the face box given: the GPU machine's OpenCV 5 has no face detector
    avatar = build_avatar("bench", [skdata.astronaut()], True, 512, 512, face_box=ASTRONAUT_FACE)
    engine.prepare_avatar(avatar)
    clip = avatar.clip(avatar.base_videos[0])
    latencies: list[float] = []
    frames_out = [0] * sessions

    async def session(k: int, stop: asyncio.Event) -> None:
        stream = engine.open_stream(avatar)
        i = 0

        def base() -> BaseFrame:
            nonlocal i
            i += 1
            return BaseFrame(clip.name, i % len(clip), clip.frames[i % len(clip)])

        async def feed() -> None:
            rng = np.random.default_rng(k)
            start, n = time.monotonic(), 0
            while not stop.is_set():
                stream.push_audio((rng.standard_normal(640) * 3000).astype(np.int16))
                n += 1
                await asyncio.sleep(max(0.0, start + 0.04 * n - time.monotonic()))

        feeder = asyncio.create_task(feed())
        try:
            while not stop.is_set():
                got = await stream.render_next(base, 25)
                now = time.monotonic()
                if measuring:
                    latencies.extend(now - f.audio_arrival for f in got)
                    frames_out[k] += len(got)
        finally:
            feeder.cancel()
            stream.close()

    measuring = False

    async def run() -> tuple[float, dict[str, Any], dict[str, Any]]:
        nonlocal measuring
        stop = asyncio.Event()
        tasks = [asyncio.create_task(session(k, stop)) for k in range(sessions)]
        await asyncio.sleep(3.0)
        before = await asyncio.to_thread(engine.stats_now)
        measuring, t = True, time.monotonic()
        await asyncio.sleep(seconds)
        measuring, dt = False, time.monotonic() - t
        after = await asyncio.to_thread(engine.stats_now)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return dt, before, after

    try:
        dt, before, after = asyncio.run(run())
    finally:
        asyncio.run(engine.aclose())
        free(models.device)
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    per = [f / dt for f in frames_out]
    return {"sessions": sessions, "decoder": decoder, "startup_s": round(startup, 1),
            "decode_chunk": settings.musetalk_decode_chunk,
            "frames": int(sum(frames_out)), "fps_out_min": round(min(per), 2),
            "fps_out_median": round(float(np.median(per)), 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "batches": after["batches"] - before["batches"],
            "mean_batch": round((after["frames"] - before["frames"])
                                / max(1, after["batches"] - before["batches"]), 1),
            "whisper_calls": after["whisper_calls"] - before["whisper_calls"],
            "gpu_busy": round((after["busy_s"] - before["busy_s"]) / dt, 3),
            "late_frames": after["late_frames"] - before["late_frames"]}


def guarded(what: str, fn, *args) -> dict[str, Any]:
    """Run one stage; a failure is recorded in the results instead of ending the benchmark."""
    try:
        return fn(*args)
    except Exception as exc:  # any failure of one stage: report it, keep the others
        traceback.print_exc()
        return {"error": f"{what}: {type(exc).__name__}: {str(exc)[:500]}"}


def goals(res: dict[str, Any]) -> dict[str, Any]:
    """Frames/s at the largest bucket, best of cuda-graph over eager kernels and over compiled
    kernels, against the issue's goals (which are at batch 32)."""
    out = {}
    for decoder, goal in GOALS.items():
        rows = res["graphs"].get(decoder, {}).get("rows") or []
        cands = [(r["bucket"], r["graph_fps"], res["graph_mode"]) for r in rows]
        cands += [(b, f, "cuda-graph + compiled kernels") for f_ in res["fused"]
                  if f_.get("decoder") == decoder and "fps" in f_ for b, f in f_["fps"].items()]
        if not cands:
            out[decoder] = {"goal_fps": goal, "bucket": None, "fps": None, "how": None, "meets": False}
            continue
        b, fps, how = max(cands, key=lambda c: (c[0], c[1]))
        out[decoder] = {"goal_fps": goal, "bucket": b, "fps": fps, "how": how,
                        "meets": b == 32 and fps >= goal}
    return out


def table(res: dict[str, Any]) -> list[str]:
    lines = ["| decoder | bucket | capture | graph ms/batch | eager ms/batch | graph frames/s | "
             "eager frames/s | max diff (levels) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for decoder, g in res["graphs"].items():
        if "error" in g:
            lines.append(f"| {decoder} | failed: {g['error'][:200]} | | | | | | |")
            continue
        lines += [f"| {decoder} | {r['bucket']} | {r['capture_s']:.2f} s | {r['graph_ms']:.2f} | "
                  f"{r['eager_ms']:.2f} | {r['graph_fps']:.1f} | {r['eager_fps']:.1f} | "
                  f"{r['max_abs_diff']} |" for r in g["rows"]]
    lines += ["", "| decoder | goal at batch 32 | measured | meets |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {d} | {g['goal_fps']:.0f} frames/s | {g['fps']} frames/s (bucket {g['bucket']}, "
              f"{g['how']}) | {'yes' if g['meets'] else 'NO'} |" for d, g in res["goals"].items()]
    lines += ["", "CUDA graph over inductor-compiled kernels (`compile_kernels=True`):", ""]
    lines += [f"- {json.dumps(f)}" for f in res["fused"]] or ["- not run (CUDA only)"]
    lines += ["", "Compile mode, one `torch.compile(dynamic=False)` per bucket; counts after runs "
              "of every size 1..max (expected: 1 compile and 0 dynamic per bucket):", "",
              "| decoder | backend (mode) | bucket | compile | compiles | dynamic | ms/batch |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in res["compile"]:
        if "buckets" not in c:
            lines.append(f"| {c.get('decoder', '')} | {c.get('skipped') or c.get('error')} | | | | | |")
            continue
        # keyed by bucket: ints as measured, strings once read back from the JSON file
        at = {k: {str(b): v for b, v in c[k].items()}
              for k in ("compile_s", "compile_counts", "dynamic_counts", "ms")}
        lines += [f"| {c['decoder']} | {c['backend']} ({c['compile_mode']}) | {b} | "
                  f"{at['compile_s'][str(b)]} s | {at['compile_counts'][str(b)]} | "
                  f"{at['dynamic_counts'][str(b)]} | {at['ms'][str(b)]} |" for b in c["buckets"]]
    lines += ["", "Streaming through the engine (speaking sessions fed in real time; audio-in to "
              "blended frame out, per frame; the core on a thread of the benchmark):", "",
              "| decoder / sessions | frames/s per session min (median) | p50 ms | p95 ms "
              "| batches (mean frames) | encoder calls | GPU busy | frames past deadline | start-up s |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for key, r in res["streaming"].items():
        if "sessions" not in r:
            lines.append(f"| {key} | {r.get('skipped') or r.get('error')} | | | | | | | |")
            continue
        lines.append(f"| {key} | {r['fps_out_min']} ({r['fps_out_median']}) | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['batches']} ({r['mean_batch']}) | {r['whisper_calls']} "
                     f"| {100 * r['gpu_busy']:.0f}% | {r['late_frames']} | {r['startup_s']} |")
    return lines


def write_doc(path: Path, res: dict[str, Any]) -> None:
    lines = [START, f"## GPU path (issue 21): {res['machine']}", "",
             f"Measured {res['started']} with `python bench/bench_gpu_path.py` ({res['label']}, "
             f"{res['dtype']}, {res['elapsed_s']:.0f} s). Times are CUDA events around a whole "
             "`BucketRunner.run` (input copies, replay, copy-out to pinned memory), median of "
             f"{res['repeats']}; graph mode `{res['graph_mode']}`.", "", *table(res), END]
    old = path.read_text() if path.exists() else "# MuseTalk engine benchmark\n"
    if START in old and END in old:
        new = old[: old.index(START)] + "\n".join(lines) + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(new)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU smoke)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--buckets", help="default 1,2,4,8,16,32 (tiny: 1,2,4,8)")
    ap.add_argument("--repeats", type=int, help="timed runs per bucket (default 10; tiny 2)")
    ap.add_argument("--compile-buckets", default="1,8")
    ap.add_argument("--fused-buckets", default="32",
                    help="buckets of the cuda-graph over compiled kernels stage (CUDA only)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="start no compile stage that would end past this many seconds "
                         "(one stage may overrun it: 7 minutes in all on an H100)")
    ap.add_argument("--sessions", default="1,16,24,32")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per streaming run")
    ap.add_argument("--stream-budget-s", type=float, default=400.0,
                    help="start no streaming run that would end past this many seconds")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu_path.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "bench_musetalk.md")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    buckets = tuple(int(x) for x in (args.buckets or ("1,2,4,8" if args.tiny else
                                                      "1,2,4,8,16,32")).split(","))
    repeats = args.repeats or (2 if args.tiny else 10)
    mode, backend = ("cuda-graph", "inductor") if cuda else ("compile", "eager")
    models = build_models(args.tiny, device, not args.no_fp16)
    print(f"{models.label} on {machine(device)}, {models.dtype}; built in "
          f"{time.perf_counter() - t_start:.1f} s", flush=True)
    res: dict[str, Any] = {"machine": machine(device), "label": models.label,
                           "dtype": str(models.dtype).replace("torch.", ""),
                           "started": time.strftime("%Y-%m-%d %H:%M"), "repeats": repeats,
                           "graph_mode": mode, "graphs": {}, "compile": [], "fused": [],
                           "streaming": {}, "complete": False}

    def save() -> None:
        """The results so far, after every stage: a run cut off at its time limit (a device
        call's) keeps what it measured."""
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))

    for decoder in ("sd-vae", "taesd"):
        res["graphs"][decoder] = guarded(f"{decoder} {mode}", bench_graphs, models, decoder, mode,
                                         buckets, repeats, backend)
        save()
    cbuckets = tuple(int(x) for x in args.compile_buckets.split(","))
    fbuckets = tuple(int(x) for x in args.fused_buckets.split(","))
    # the decisive figure first (SD-VAE at batch 32 needs compiled kernels for 400 frames/s)
    stages = [("fused", "sd-vae"), ("compile", "sd-vae"), ("fused", "taesd"), ("compile", "taesd")]
    last = 0.0
    for kind, decoder in stages:  # time-boxed: skip a stage that would not fit
        if kind == "fused" and not cuda:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed + 1.2 * last > args.budget_s:
            res[kind].append({"decoder": decoder, "skipped": f"time box: {elapsed:.0f} s used, "
                              f"the last stage took {last:.0f} s"})
            continue
        t0 = time.perf_counter()
        if kind == "compile":
            res[kind].append(guarded(f"{decoder} compile", bench_compile, models, decoder,
                                     cbuckets, repeats, "inductor" if cuda else "eager"))
        else:
            res[kind].append(guarded(f"{decoder} fused", bench_fused, models, decoder, fbuckets,
                                     repeats))
        res[kind][-1].setdefault("decoder", decoder)
        last = time.perf_counter() - t0
        save()
    res["goals"] = goals(res)
    save()
    for decoder in ("sd-vae", "taesd"):
        for n in (int(x) for x in args.sessions.split(",")):
            key = f"{decoder}/{n}"
            if time.perf_counter() - t_start + args.seconds + 20 > args.stream_budget_s:
                res["streaming"][key] = {"skipped": "time box"}
                continue
            res["streaming"][key] = guarded(f"streaming {key}", stream_sessions, models,
                                            decoder, n, args.seconds)
            save()
    res["complete"] = True
    save()
    print("\n".join(table(res)))
    print(f"wrote {args.json} ({res['elapsed_s']:.0f} s)")
    if cuda:
        write_doc(args.doc, res)


if __name__ == "__main__":
    main()
