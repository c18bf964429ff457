"""The MuseTalk GPU path's host side on a CPU: batched audio features, the inference process
(against the same core in a thread), a crash of it, and the GPU stand-in."""

from __future__ import annotations

import asyncio
import math
import os
import queue
import signal
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from websocket_service.config import Settings  # noqa: E402
from websocket_service.engines.musetalk import MuseTalkEngine  # noqa: E402
from websocket_service.engines.musetalk.audio import LogMel, WhisperStates  # noqa: E402
from websocket_service.engines.musetalk.loader import load_whisper  # noqa: E402
from websocket_service.engines.musetalk.schedule import CostModel, admission_limit  # noqa: E402
from websocket_service.errors import ProcessingError, RateLimitExceeded  # noqa: E402
from websocket_service.media.picture import to_i420, to_rgb  # noqa: E402

from .musetalk_tiny import Bases, render_all, small_avatar, speech, write_tiny_model  # noqa: E402
from .support import until  # noqa: E402


def settings(model: Path | None, **kw) -> Settings:
    """Buckets up to 4 frames: the tiny model on a CPU times every bucket at start-up (a batch
    of 32 takes ~2 s here)."""
    kw = {"musetalk_max_streams": 64, "batch_max": 4, **kw}
    return Settings(_env_file=None, engine="musetalk", model_path=model or Path("/nonexistent"),
                    device="cpu", **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def speak(engine: MuseTalkEngine, avatar, n: int, seed: int = 0) -> list:
    async def run():
        stream = engine.open_stream(avatar)
        try:
            stream.push_audio(speech(n, seed))
            stream.end_segment()
            return await render_all(stream, Bases(avatar), max_frames=8)
        finally:
            stream.close()

    return asyncio.run(run())


# ------------------------------------------------------------------ batched audio features

def test_one_encoder_call_for_many_windows_equals_one_call_each(model):
    encoder, _, fe, _ = load_whisper(model)
    encoder.eval()
    logmel = LogMel(fe.mel_filters, fe.n_fft, fe.hop_length, fe.n_samples, torch.device("cpu"))
    states = WhisperStates(encoder, logmel, "short")
    rng = np.random.default_rng(3)
    windows = np.stack([speech(30, seed=k) for k in range(4)])
    windows[2] //= 8  # quieter: the log-mel's per-window normalisation must stay per window
    windows[3, :6000] = 0  # a window zero-padded on the left (an utterance's start)
    windows[1] += rng.integers(-50, 50, windows.shape[1]).astype(np.int16)
    with torch.inference_mode():
        batched = states.batch(windows)
        alone = torch.stack([states(w) for w in windows])
    assert batched.shape == alone.shape == (4, 30 * 2, states.n_layers, 384)
    assert torch.allclose(batched, alone, atol=1e-4), (batched - alone).abs().max()
    mel_b = logmel(torch.as_tensor(windows.astype(np.float32) / 32768))
    mel_1 = logmel(torch.as_tensor(windows[2].astype(np.float32) / 32768))
    assert torch.allclose(mel_b[2], mel_1, atol=1e-6)


# ------------------------------------------------------------------ the inference process

def job_by_job(eng: MuseTalkEngine, avatar, jobs: int) -> np.ndarray:
    """``jobs`` jobs of 2 frames straight to the engine's runner, each awaited before the next
    (one window, one batch each): their faces in order."""
    key = avatar.engine_data["musetalk"]["key"]
    out = []
    for j in range(jobs):
        meta = {"session": 1, "avatar": key, "offset": j * 4 - 40, "n_valid": None,
                "frames": [[j * 2 + k, "idle", k % 3, 0.0] for k in range(2)]}
        pcm = speech(eng.window_samples // 640, seed=j)
        out.append(eng.runner.submit(meta, pcm, 2).result(timeout=120))
    return np.concatenate(out)


def test_inference_process_gives_the_faces_the_in_process_core_gives(model, tmp_path):
    avatar = small_avatar(tmp_path / "avatars")
    here = MuseTalkEngine(settings(model, musetalk_process=False))
    there = MuseTalkEngine(settings(model, musetalk_process=True))
    before = shm_names()
    here.load()
    there.load()
    try:
        assert there.info()["inference_process"]["separate"]
        assert not here.info()["inference_process"]["separate"]
        # the inference process froze its start-up objects (models, imports) for the collector
        assert there.info()["inference_process"]["gc_frozen_objects"] > 10_000
        assert here.info()["inference_process"]["gc_frozen_objects"] is None
        here.prepare_avatar(avatar)
        there.prepare_avatar(avatar)
        # job by job (one window, one batch each): the same arithmetic on both sides, so the
        # faces must be the same bytes
        faces = {name: job_by_job(eng, avatar, 4) for name, eng in (("here", here),
                                                                       ("there", there))}
        assert faces["here"].shape == (8, 256, 256, 3)
        assert np.array_equal(faces["here"], faces["there"])
        assert len({f.tobytes() for f in faces["here"]}) == 8  # audio-driven: all different
        # streaming through sessions: batches form as the frames come (timing), and a CPU
        # convolution's rounding depends on the batch size, so allow a level either way
        a = speak(here, avatar, 7, seed=5)
        b = speak(there, avatar, 7, seed=5)
    finally:
        asyncio.run(here.aclose())
        asyncio.run(there.aclose())
    assert [f.index for f in a] == [f.index for f in b] == list(range(7))
    for fa, fb in zip(a, b, strict=True):
        assert np.abs(fa.image.astype(int) - fb.image).max() <= 1
    assert shm_names() - before == set()  # no shared-memory segment outlives the engine


def test_faces_decoded_in_chunks_are_the_whole_batchs_faces(model, tmp_path):
    """The real networks (tiny model): each job is one batch of 2 frames; decoded in one call
    (MUSETALK_DECODE_CHUNK=0) or in two chunks of 1, through the core's UNet runner (latents
    kept on the device) and its decoder runner."""
    avatar = small_avatar(tmp_path / "avatars")
    whole = MuseTalkEngine(settings(model, musetalk_process=False, musetalk_decode_chunk=0))
    chunked = MuseTalkEngine(settings(model, musetalk_process=False, musetalk_decode_chunk=1))
    faces = {}
    try:
        for name, eng in (("whole", whole), ("chunked", chunked)):
            eng.load()
            assert eng.info()["decode_chunk"] == (1 if name == "chunked" else 0)
            eng.prepare_avatar(avatar)
            faces[name] = job_by_job(eng, avatar, 3)
            assert eng.stats_now()["batches"] == 3
    finally:
        asyncio.run(whole.aclose())
        asyncio.run(chunked.aclose())
    assert faces["chunked"].shape == (6, 256, 256, 3)
    assert len({f.tobytes() for f in faces["chunked"]}) == 6
    # decoded at batch size 1 instead of 2: a CPU convolution's rounding, a level at most
    diff = np.abs(faces["chunked"].astype(int) - faces["whole"])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_crashed_inference_process_fails_its_frames_and_comes_back(model, tmp_path):
    avatar = small_avatar(tmp_path / "avatars")
    eng = MuseTalkEngine(settings(model, musetalk_process=True, batch_wait_ms=100,
                                  musetalk_deadline_ms=5000))
    before = shm_names()
    eng.load()
    try:
        eng.prepare_avatar(avatar)
        runner = eng.runner
        stream = eng.open_stream(avatar)

        async def crash_mid_render():
            # the process is frozen first, so the frames are certainly still in flight when it
            # dies, however fast or slow this machine is
            os.kill(runner.pid, signal.SIGSTOP)
            stream.push_audio(speech(30))
            stream.end_segment()
            render = asyncio.create_task(stream.render_next(Bases(avatar), 8))
            await asyncio.to_thread(_wait_for, lambda: runner.jobs_in_flight > 0)
            os.kill(runner.pid, signal.SIGKILL)
            with pytest.raises(ProcessingError) as err:
                await render
            return err.value

        err = asyncio.run(crash_mid_render())
        stream.close()
        assert err.code == "PROCESSING_ERROR" and "inference process" in err.message
        _wait_for(lambda: runner.restarts == 1 and runner.alive)
        frames = speak(eng, avatar, 5, seed=1)  # the avatar was handed to the new process
        assert [f.index for f in frames] == list(range(5))
        assert eng.info()["inference_process"]["restarts"] == 1
    finally:
        asyncio.run(eng.aclose())
    assert shm_names() - before == set()


def _wait_for(pred, timeout: float = 60.0) -> None:
    """Poll a cross-process condition (no event to wait on across the process boundary)."""

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# ------------------------------------------------------------------ the GPU stand-in

def test_the_stand_in_needs_no_weights_says_so_and_returns_the_avatars_face(tmp_path):
    avatar = small_avatar(tmp_path / "avatars")
    eng = MuseTalkEngine(settings(None, gpu_standin="h100", musetalk_process=False,
                                  musetalk_max_streams=0, batch_max=32))
    eng.load()
    try:
        info = eng.info()
        assert info["gpu_standin"] == "h100" and info["files"] == {}
        expected = admission_limit(CostModel.from_table("h100", chunk=8), 32, 2,
                                   utilisation=0.95)
        assert info["admission_limit"] == expected >= 16
        eng.prepare_avatar(avatar)
        frames = speak(eng, avatar, 6)
        assert [f.index for f in frames] == list(range(6))
        clips = avatar.engine_data["musetalk"]["clips"]
        for f in frames:  # the face is the avatar's own crop, resized there and back
            x1, y1, x2, y2 = clips[f.base.clip].boxes[f.base.index]
            image = to_rgb(f.image)  # I420
            diff = np.abs(image[y1:y2, x1:x2].astype(int) - f.base.image[y1:y2, x1:x2])
            assert diff.mean() < 4
            top = y1 & ~1  # above the box, whole chroma rows: the base frame's own bytes
            assert np.array_equal(f.image[:top], to_i420(f.base.image)[:top])
        stats = eng.stats_now()
        assert stats["frames"] == 6 and stats["whisper_windows"] == 3  # one window per hop
        streams = [eng.open_stream(avatar) for _ in range(expected)]
        with pytest.raises(RateLimitExceeded) as refused:  # one past what the H100 serves
            eng.open_stream(avatar)
        assert refused.value.details == {"streams": expected, "limit": expected}
        streams.pop().close()
        streams.append(eng.open_stream(avatar))  # a closed stream's place is free again
        for s in streams:
            s.close()
    finally:
        asyncio.run(eng.aclose())


def test_a_batchs_first_chunk_comes_back_while_the_rest_decodes():
    """Decoding in chunks (MUSETALK_DECODE_CHUNK): the stand-in core's GPU waits are gated here,
    one at a time. A batch of 8 frames (4 jobs of 2) decodes in chunks of 2: while the lane is
    inside the second chunk, the core's thread already hands back the first chunk's faces,
    which finish the first job, and no other job."""
    from websocket_service.engines.musetalk.audio import fixed_window_samples
    from websocket_service.engines.musetalk.core import CoreSpec, build_core
    from websocket_service.engines.musetalk.engine import WHISPER_SAMPLES

    window = fixed_window_samples(16000, 2, WHISPER_SAMPLES)
    spec = CoreSpec("", "v15", "cpu", False, "sd-vae", "eager", "h100", 8, 1000.0, 2, "short",
                    window, decode_chunk=2)
    core = build_core(spec)
    waits: queue.Queue[tuple[float, threading.Event]] = queue.Queue()

    def gated(seconds: float) -> None:
        go = threading.Event()
        waits.put((seconds, go))
        assert go.wait(30)

    assert core.standin is not None
    core.standin._sleep = gated
    try:
        face = np.full((256, 256, 3), 9, np.uint8)
        core.control("add_avatar", ("a", {"faces": {"idle": face[None]}}))
        due = time.monotonic() + 60  # far: only a full batch (8 frames) launches

        def submit(job: int) -> None:
            meta = {"session": job, "avatar": "a", "offset": 0, "n_valid": None,
                    "frames": [[k, "idle", 0, due] for k in range(2)]}
            core.submit(job, meta, np.zeros(window, np.int16))

        def next_wait() -> float:
            seconds, go = waits.get(timeout=30)
            go.set()
            return seconds

        submit(1)
        first_call, go = waits.get(timeout=30)  # the lane is in job 1's encoder call
        for job in (2, 3, 4):
            submit(job)
        go.set()
        cost = core.cost
        assert first_call == pytest.approx(cost.whisper_s(1))
        assert next_wait() == pytest.approx(cost.whisper_s(3))  # jobs 2-4 in one call
        assert next_wait() == pytest.approx(cost.unet_s(8))     # the batch: UNet, bucket 8
        assert next_wait() == pytest.approx(cost.chunk_s(2, 8))  # the first chunk
        second, go = waits.get(timeout=30)  # the lane waits in the second chunk now
        assert second == pytest.approx(cost.chunk_s(2, 8))
        results, wake = core.step(time.monotonic())
        assert [(job, k) for job, k, _ in results] == [(1, 0), (1, 1)]
        assert all(np.array_equal(f, face) for _, _, f in results)
        assert wake < math.inf  # it comes back for the next chunk
        go.set()
        assert next_wait() == next_wait() == pytest.approx(cost.chunk_s(2, 8))
        got: list[tuple[int, int]] = []
        until_s = time.monotonic() + 30
        while len(got) < 6 and time.monotonic() < until_s:
            got += [(job, k) for job, k, _ in core.step(time.monotonic())[0]]
        assert got == [(j, k) for j in (2, 3, 4) for k in (0, 1)]
        until_s = time.monotonic() + 30  # counted when the batch's last chunk is handed back
        while core.stats()["batches"] == 0 and time.monotonic() < until_s:
            time.sleep(0.001)
        assert core.stats()["batches"] == 1 and core.stats()["frames"] == 8
    finally:
        core.close()


def test_the_standin_computes_the_log_mel_of_its_windows_in_batches_off_the_lane():
    """The stand-in's log-mel (its host cost; the real engine runs it on the device) goes in
    batches of STANDIN_MEL_BATCH windows on the submitting thread, and the lane's encoder call
    waits only the table's time: CPU work on the lane would make every batch behind it late."""
    from websocket_service.engines.musetalk.audio import fixed_window_samples
    from websocket_service.engines.musetalk.core import STANDIN_MEL_BATCH, CoreSpec, build_core
    from websocket_service.engines.musetalk.engine import WHISPER_SAMPLES

    window = fixed_window_samples(16000, 2, WHISPER_SAMPLES)
    spec = CoreSpec("", "v15", "cpu", False, "sd-vae", "eager", "h100", 32, 1000.0, 2, "short",
                    window)
    core = build_core(spec)
    assert core.standin is not None
    waits: list[float] = []
    core.standin._sleep = waits.append
    submitter = threading.get_ident()
    calls: list[tuple[tuple[int, ...], int, float]] = []
    logmel = core.logmel

    def spy(audio: torch.Tensor) -> torch.Tensor:
        out = logmel(audio)
        calls.append((tuple(audio.shape), threading.get_ident(), float(out.abs().sum())))
        return out

    core.logmel = spy
    try:
        core.control("add_avatar", ("a", {"faces": {"idle": np.zeros((1, 256, 256, 3), np.uint8)}}))
        rng = np.random.default_rng(3)
        for job in range(STANDIN_MEL_BATCH + 1):
            core.submit(job, {"session": job, "avatar": "a", "offset": 0, "n_valid": None,
                              "frames": [[0, "idle", 0, time.monotonic() + 60]]},
                        rng.integers(-3000, 3000, window).astype(np.int16))
        assert [(shape, who) for shape, who, _ in calls] == [((STANDIN_MEL_BATCH, window),
                                                              submitter)]
        assert calls[0][2] > 0  # a real spectrogram of real windows
        until_s = time.monotonic() + 30
        while core.stats()["whisper_windows"] < STANDIN_MEL_BATCH + 1 and time.monotonic() < until_s:
            time.sleep(0.001)
        assert core.stats()["whisper_windows"] == STANDIN_MEL_BATCH + 1
        # the lane's first encoder call (over however many windows had come) waited its time
        calls_s = [core.cost.whisper_s(n) for n in range(1, STANDIN_MEL_BATCH + 2)]
        assert waits and any(waits[0] == pytest.approx(c) for c in calls_s)
    finally:
        core.close()


def test_a_chunk_that_fails_fails_only_the_jobs_not_yet_handed_back():
    """The decoder fails in a batch's second chunk: the first chunk's job has its faces, the
    jobs of the chunks not decoded fail, and the lane goes on with the next batch."""
    from websocket_service.engines.musetalk.audio import fixed_window_samples
    from websocket_service.engines.musetalk.core import CoreSpec, build_core
    from websocket_service.engines.musetalk.engine import WHISPER_SAMPLES

    window = fixed_window_samples(16000, 2, WHISPER_SAMPLES)
    spec = CoreSpec("", "v15", "cpu", False, "sd-vae", "eager", "h100", 8, 1000.0, 2, "short",
                    window, decode_chunk=2)
    core = build_core(spec)
    assert core.standin is not None
    chunk_s = core.cost.chunk_s(2, 8)
    calls: list[float] = []

    def failing_second_chunk(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 4:  # encoder call, UNet, first chunk, now the second chunk
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    core.standin._sleep = failing_second_chunk
    try:
        core.control("add_avatar", ("a", {"faces": {"idle": np.zeros((1, 256, 256, 3), np.uint8)}}))
        due = time.monotonic() + 60
        pcm = np.zeros((4, window), np.int16)
        with core._cv:  # one step: one encoder call, then a full batch of 8
            for job in range(1, 5):
                core._new.append((job, {"session": job, "avatar": "a", "offset": 0,
                                        "n_valid": None,
                                        "frames": [[k, "idle", 0, due] for k in range(2)]},
                                  pcm[job - 1]))
            core._cv.notify()
        handed: list[tuple[int, int]] = []
        failed: list[tuple[int, str]] = []
        until_s = time.monotonic() + 30
        while len(failed) < 3 and time.monotonic() < until_s:
            handed += [(job, k) for job, k, _ in core.step(time.monotonic())[0]]
            failed += core.failed()
            time.sleep(0.001)
        assert calls[2] == pytest.approx(chunk_s) and calls[3] == pytest.approx(chunk_s)
        assert handed == [(1, 0), (1, 1)]
        assert [job for job, _ in failed] == [2, 3, 4]
        assert all("illegal memory access" in msg for _, msg in failed)
        # the lane goes on: the next job is rendered
        core.submit(5, {"session": 5, "avatar": "a", "offset": 0, "n_valid": None,
                        "frames": [[0, "idle", 0, time.monotonic()]]}, pcm[0])
        got: list[int] = []
        until_s = time.monotonic() + 30
        while not got and time.monotonic() < until_s:
            got = [job for job, _, _ in core.step(time.monotonic())[0]]
            time.sleep(0.001)
        assert got == [5]
    finally:
        core.close()


def test_the_jitter_allowance_is_the_recent_p95_of_ready_latency_plus_a_margin():
    from websocket_service.engines.musetalk.stream import ReadyLatency

    ready = ReadyLatency(window=100)
    ready.observe([0.05] * 19)
    assert ready.delay() == 0.0  # too few to say
    ready.observe([0.05] * 80 + [0.2] * 1)
    assert ready.delay() == pytest.approx(0.05 + ReadyLatency.MARGIN_S)
    ready.observe([0.2] * 100)  # the window moves on: a slower engine now
    assert ready.delay() == pytest.approx(0.2 + ReadyLatency.MARGIN_S)
    ready.observe([5.0] * 100)
    assert ready.delay() == ReadyLatency.MAX_S


# ------------------------------------------------------------------ jobs through the core

def test_a_jobs_frames_are_scheduled_together_by_its_first_due(tmp_path):
    """Job A's frames are due at +0.1 s and +10 s, job B's one frame at +1 s, one frame a
    batch. The core schedules a job's frames at its first frame's due time (they come back
    together), so A's second frame does not wait behind B: A is back first."""
    # the longest max wait (100 ms, against 7 ms a batch): batches go by due time (EDF)
    eng = MuseTalkEngine(settings(None, gpu_standin="h100", musetalk_process=False, batch_max=1,
                                  batch_wait_ms=100))
    eng.load()
    try:
        avatar = small_avatar(tmp_path / "avatars")
        eng.prepare_avatar(avatar)
        key = avatar.engine_data["musetalk"]["key"]
        now = time.monotonic()
        pcm = np.zeros(eng.window_samples, np.int16)

        def job(session: int, dues: list[float]) -> dict:
            return {"session": session, "avatar": key, "offset": 0, "n_valid": None,
                    "frames": [[k, "idle", 0, now + d] for k, d in enumerate(dues)]}

        order: list[str] = []
        a = eng.runner.submit(job(1, [0.1, 10.0]), pcm, 2)
        b = eng.runner.submit(job(2, [1.0]), pcm, 1)
        a.add_done_callback(lambda _: order.append("A"))
        b.add_done_callback(lambda _: order.append("B"))
        assert a.result(60).shape == (2, 256, 256, 3) and b.result(60).shape == (1, 256, 256, 3)
        assert order == ["A", "B"]
    finally:
        asyncio.run(eng.aclose())


def _on_a_stream(tmp_path, body) -> None:
    """``await body(stream, avatar, blended)`` on a stand-in engine's stream whose blends are
    recorded (``blended``: how many frames each finished blend took)."""
    eng = MuseTalkEngine(settings(None, gpu_standin="h100", musetalk_process=False))
    eng.load()

    async def run():
        stream = eng.open_stream(avatar)
        blended: list[int] = []
        blend_all = stream._blend_all

        def recording(bases, faces):
            out = blend_all(bases, faces)
            blended.append(len(bases))
            return out

        stream._blend_all = recording  # what the faces' callback calls
        try:
            await body(stream, avatar, blended)
        finally:
            stream.close()

    try:
        avatar = small_avatar(tmp_path / "avatars")
        eng.prepare_avatar(avatar)
        asyncio.run(run())
    finally:
        asyncio.run(eng.aclose())


def test_faces_are_blended_as_they_come_back_and_ready_latency_counts_to_the_hand_over(tmp_path):
    """The second hop's faces come back while the producer is not asking: their blend runs
    then, so the producer's next call returns at once; the allowance learns from each frame's
    audio arrival to its hand-over."""

    async def body(stream, avatar, blended):
        bases = Bases(avatar)
        stream.push_audio(speech(4, 0))
        stream.end_segment()
        first = await stream.render_next(bases, 2)  # one hop; the other went to the core too
        assert [f.index for f in first] == [0, 1]
        await until(lambda: sum(blended) == 4, what="the second hop blended unasked")
        calls = len(blended)
        second = await stream.render_next(bases, 2)
        assert [f.index for f in second] == [2, 3] and len(blended) == calls
        after = stream.engine.ready._recent
        assert len(after) == 4
        now = time.monotonic()
        for f, waited in zip(first + second, after, strict=True):
            assert 0 < waited <= now - f.audio_arrival

    _on_a_stream(tmp_path, body)


def test_faces_that_come_back_after_an_interrupt_are_not_blended(tmp_path):
    """Hops sent, then an interrupt before any can come back (each takes the stand-in's
    waits, milliseconds): their faces come back, rendered or dropped by the core, and none is
    blended."""

    async def body(stream, avatar, blended):
        stream.push_audio(speech(5, 0))  # 2 frames and their look-ahead
        first = await stream.render_next(Bases(avatar), 2)
        assert [f.index for f in first] == [0, 1] and sum(blended) == 2
        stream.push_audio(speech(8, 1))  # more hops go to the core at once ...
        sent = list(stream._inflight)
        assert sent
        stream.interrupt()  # ... and are interrupted before any is back
        await until(lambda: all(j.future.done() for j in sent), what="the hops back")
        assert all(j.blend is None for j in sent) and sum(blended) == 2

    _on_a_stream(tmp_path, body)
