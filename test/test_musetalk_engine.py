"""The MuseTalk engine on a tiny random-weight model in the official layout (CPU, no downloads)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import time
import weakref
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from websocket_service.avatars.model import Avatar  # noqa: E402
from websocket_service.config import Settings  # noqa: E402
from websocket_service.engines import create_engine  # noqa: E402
from websocket_service.engines.musetalk import MuseTalkEngine  # noqa: E402
from websocket_service.engines.musetalk.audio import (  # noqa: E402
    fixed_window,
    fixed_window_samples,
    frame_window,
    positional_encoding,
)
from websocket_service.errors import ModelNotFound, RateLimitExceeded  # noqa: E402
from websocket_service.media.picture import planes, to_i420, to_rgb  # noqa: E402

from .musetalk_tiny import (  # noqa: E402
    SIZE,
    Bases,
    copy_without,
    render_all,
    small_avatar,
    speech,
    write_tiny_model,
)


def settings(model: Path, **kw) -> Settings:
    """In-process inference (a thread: no child to start per engine) unless a test asks, and no
    admission limit from the tiny model's CPU speed."""
    kw = {"musetalk_process": False, "musetalk_max_streams": 64, "batch_max": 4, **kw}
    return Settings(_env_file=None, engine="musetalk", model_path=model, device="cpu", **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), ("v15", "v10"))


@pytest.fixture(scope="module")
def engine(model):
    eng = create_engine(settings(model, batch_max=8, batch_wait_ms=30))
    yield eng
    asyncio.run(eng.aclose())


@pytest.fixture(scope="module")
def avatar(engine, tmp_path_factory) -> Avatar:
    av = small_avatar(tmp_path_factory.mktemp("avatars"))
    engine.prepare_avatar(av)
    return av


# ------------------------------------------------------------------ loader

def test_loads_both_layouts(model):
    for version in ("v15", "v10"):
        eng = MuseTalkEngine(settings(model, musetalk_version=version))
        eng.load()
        info = eng.info()
        assert info["loaded"] and info["device"] == "cpu" and info["version"] == version
        assert info["mask"].startswith("geometric")
        assert ("unet.pth" if version == "v15" else "pytorch_model.bin") in info["files"]["unet"]
        asyncio.run(eng.aclose())


@pytest.mark.parametrize("missing", ["musetalkV15/unet.pth", "musetalkV15/musetalk.json",
                                     "sd-vae/config.json", "sd-vae/diffusion_pytorch_model.bin",
                                     "whisper/pytorch_model.bin", "whisper/config.json"])
def test_missing_file_names_it(model, tmp_path, missing):
    broken = copy_without(model, tmp_path / "m", missing)
    with pytest.raises(ModelNotFound) as err:
        create_engine(settings(broken))
    assert missing in err.value.message and err.value.fatal


def test_broken_file_names_it(model, tmp_path):
    import shutil

    shutil.copytree(model, tmp_path / "m")
    (tmp_path / "m/musetalkV15/unet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFound, match="musetalkV15/unet.pth"):
        create_engine(settings(tmp_path / "m"))


def test_missing_extra_is_a_clear_error(model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(ModelNotFound, match=r"musetalk.*extra.*diffusers"):
        create_engine(settings(model))


def test_parsing_net_loads_and_shapes_the_mask(model, tmp_path):
    import shutil

    shutil.copytree(model, tmp_path / "m")
    write_tiny_model(tmp_path / "p", (), parsing=True)
    shutil.copytree(tmp_path / "p/face-parse-bisent", tmp_path / "m/face-parse-bisent")
    eng = create_engine(settings(tmp_path / "m"))
    try:
        assert eng.info()["mask"] == "face-parsing"
        av = small_avatar(tmp_path / "av", frames=1)
        eng.prepare_avatar(av)
        clip = av.engine_data["musetalk"]["clips"]["idle"]
        x1, y1, x2, y2 = clip.boxes[0]
        assert clip.masks[0].shape == (y2 - y1, x2 - x1)
        assert not clip.masks[0][: (y2 - y1) // 2].any()
    finally:
        asyncio.run(eng.aclose())


# ------------------------------------------------------------------ audio features

def test_frame_window_against_hand_made_features():
    t, layers, dim = 30, 5, 3
    # feature value encodes (absolute encoder frame k, layer l): 100 * (k + 1) + l
    k = torch.arange(t)[:, None, None]
    lay = torch.arange(layers)[None, :, None]
    feats = (100 * (k + 1) + lay).float().expand(t, layers, dim).clone()

    def expect(f: int, lo: int, hi: int) -> torch.Tensor:
        rows = []
        for j in range(10):  # padded frames [2f, 2f+10) = real frames [2f-4, 2f+6)
            kk = 2 * f - 4 + j
            for ll in range(layers):
                v = 100 * (kk + 1) + ll if lo <= kk < hi else 0
                rows.append([v] * dim)
        return torch.tensor(rows, dtype=torch.float32)

    assert torch.equal(frame_window(feats, 0), expect(0, 0, t))  # 4 zero frames on the left
    assert torch.equal(frame_window(feats, 5), expect(5, 0, t))
    assert torch.equal(frame_window(feats, 14), expect(14, 0, t))  # right edge: zeros past 30
    assert frame_window(feats, 0).shape == (50, dim)
    # a window that starts at encoder frame 8 of the utterance, which is 20 frames long
    part = feats[8:]
    shifted = (part - 0).clone()
    got = frame_window(shifted, 6, offset=8, n_valid=20)
    ref = expect(6, 8, 20)
    # values in ``part`` are those of frames 8.. of ``feats``, so the expectation is unchanged
    assert torch.equal(got, ref)


def test_positional_encoding_is_sin_even_cos_odd():
    pe = positional_encoding(50, 384)
    assert pe.shape == (50, 384)
    p, i = 7, 10
    assert pe[p, 2 * i] == pytest.approx(np.sin(p / 10000 ** (2 * i / 384)), abs=1e-6)
    assert pe[p, 2 * i + 1] == pytest.approx(np.cos(p / 10000 ** (2 * i / 384)), abs=1e-6)
    assert torch.equal(pe[0, 0::2], torch.zeros(192)) and torch.equal(pe[0, 1::2], torch.ones(192))


def test_fixed_windows_cover_the_lookahead_with_one_length():
    length = fixed_window_samples(16000, 2, 480000)
    assert length == 16000 + (2 + 3) * 640 and length % 320 == 0
    assert fixed_window_samples(16000, 2, 10000) == 10000 - 10000 % 320  # capped
    start, end = fixed_window(11, received=20 * 640, ended=False, length=length)
    assert end == (11 + 1 + 3) * 640 and end - start == length and start < 0  # left zero padding
    start, end = fixed_window(41, received=60 * 640, ended=False, length=length)
    assert (start, end) == ((41 + 4) * 640 - length, (41 + 4) * 640)
    _, end = fixed_window(6, received=6 * 640 + 100, ended=True, length=length)
    assert end == 7 * 640  # an ended utterance: up to the last frame's own slot, no further
    start, end = fixed_window(3, received=6 * 640 + 100, ended=True, length=length)
    assert end == 6 * 640 + 320 and end - start == length  # the end, rounded to an encoder frame


# ------------------------------------------------------------------ avatar cache

def test_latent_cache_round_trip(engine, avatar):
    first = avatar.engine_data.pop("musetalk")
    assert (avatar.path / "musetalk_v15.pt").is_file()
    again = MuseTalkEngine(engine.settings)  # a restarted engine, same weights and core
    for name in ("runner", "core_info", "vae", "parsing", "files", "device", "dtype"):
        setattr(again, name, getattr(engine, name))
    again.prepare_avatar(avatar)
    second = avatar.engine_data["musetalk"]
    assert second["source"] == "disk" and second["key"] == first["key"]
    for name, clip in first["clips"].items():
        other = second["clips"][name]
        assert torch.equal(clip.latents, other.latents)
        assert np.array_equal(clip.boxes, other.boxes)
        assert all(np.array_equal(a, b) for a, b in zip(clip.masks, other.masks, strict=True))
        assert clip.latents.shape[1:] == (8, 32, 32)


# ------------------------------------------------------------------ streaming

def test_stream_renders_exactly_n_frames_touching_only_the_lower_face(engine, avatar):
    n = 7
    stream = engine.open_stream(avatar)
    bases = Bases(avatar)
    pcm = speech(n)

    async def run():
        for piece in np.array_split(pcm, [500, 1900, 2000, 3333]):  # uneven chunks
            stream.push_audio(piece)
        stream.end_segment()
        return await render_all(stream, bases)

    frames = asyncio.run(run())
    assert [f.index for f in frames] == list(range(n))
    assert [f.last for f in frames] == [False] * (n - 1) + [True]
    clips = avatar.engine_data["musetalk"]["clips"]
    changed = 0
    for f in frames:  # I420 pictures (what the encoder takes), compared plane by plane
        assert f.image.shape == (SIZE * 3 // 2, SIZE) and f.image.dtype == np.uint8
        ok, jpg = cv2.imencode(".jpg", to_rgb(f.image))
        assert ok and cv2.imdecode(jpg, cv2.IMREAD_COLOR).shape == (SIZE, SIZE, 3)
        got, base = planes(f.image), planes(to_i420(f.base.image))
        x1, y1, x2, y2 = clips[f.base.clip].boxes[f.base.index]
        mid = (y1 + y2) // 2
        for k, (a, b) in enumerate(zip(got, base, strict=True)):
            s = 1 if k == 0 else 2  # chroma: a sample per 2x2 pixels
            top = mid // s  # everything above the mouth half
            assert np.array_equal(a[:top], b[:top])
            outside = np.ones(b.shape, bool)  # the box, widened to whole chroma samples
            outside[y1 // s:-(-y2 // s), x1 // s:-(-x2 // s)] = False
            assert np.array_equal(a[outside], b[outside])
        y_got, y_base = got[0][mid:y2, x1:x2].astype(int), base[0][mid:y2, x1:x2]
        changed += int(np.abs(y_got - y_base).sum() > 0)
    assert changed == n
    assert stream.buffered_samples() == 0 and stream.ready_frames() == 0


def test_rendered_frames_are_freed_by_reference_counting(engine, avatar):
    """A job's faces and blended images go as soon as its frames do, not at some later full
    collection: with the collector off, nothing of the stream's keeps them (a job held by its
    own future's callback kept ~1 GB alive between full collections at 16 sessions)."""
    stream = engine.open_stream(avatar)
    stream.push_audio(speech(8))
    stream.end_segment()
    gc.collect()
    gc.disable()
    try:
        frames = asyncio.run(render_all(stream, Bases(avatar)))
        images = [weakref.ref(f.image) for f in frames]
        assert len(images) == 8 and all(r() is not None for r in images)
        del frames
        alive = sum(r() is not None for r in images)
    finally:
        gc.enable()
    assert alive == 0
    assert stream.ready_frames() == 0


def test_hop_gates_rendering_until_lookahead_is_there(engine, avatar):
    stream = engine.open_stream(avatar)
    hop = engine.hop
    # frame 0 needs its own slot + 3 frames of audio, and its hop's last frame hop - 1 more:
    # 1 + lookahead_frames frames in all; one short of that, nothing renders
    stream.push_audio(speech(engine.lookahead_frames))
    assert stream.ready_frames() == 0
    stream.push_audio(speech(1))
    assert stream.ready_frames() == hop
    assert engine.lookahead_frames == 3 + hop - 1


def test_interrupt_returns_empty(engine, avatar):
    stream = engine.open_stream(avatar)

    async def run():
        waiting = asyncio.create_task(stream.render_next(Bases(avatar), 4))
        await asyncio.sleep(0)  # one step: it runs until it waits for audio
        assert not waiting.done()
        stream.interrupt()
        first = await waiting
        stream.push_audio(speech(12))
        in_flight = asyncio.create_task(stream.render_next(Bases(avatar), 4))
        await asyncio.sleep(0)  # let it take the slots and start working
        stream.interrupt()
        second = await in_flight
        return first, second

    first, second = asyncio.run(run())
    assert first == [] and second == []
    assert stream.buffered_samples() == 0 and stream.ready_frames() == 0


def test_frames_of_several_sessions_share_one_forward_pass(model, avatar):
    # an engine of its own: frames an earlier test left in flight on the module's engine (an
    # interrupted render) must not land in this test's counts
    engine = create_engine(settings(model, batch_max=8, batch_wait_ms=30))
    try:
        engine.prepare_avatar(avatar)
        shares_one_forward_pass(engine, avatar)
    finally:
        asyncio.run(engine.aclose())


def shares_one_forward_pass(engine, avatar) -> None:
    before = engine.stats_now()
    # 4 frames each, batches of up to 8: the first session's windows may reach the core alone
    # (and fill a batch of their own), the others' come during its encoder call and share one
    n, sessions = 4, 3

    async def one(k: int):
        stream = engine.open_stream(avatar)
        stream.push_audio(speech(n, seed=k))
        stream.end_segment()
        return await render_all(stream, Bases(avatar), max_frames=8)

    async def run():
        return await asyncio.gather(*(one(k) for k in range(sessions)))

    results = asyncio.run(run())
    assert [len(r) for r in results] == [n] * sessions
    after = engine.stats_now()
    frames = after["frames"] - before["frames"]
    batches = after["batches"] - before["batches"]
    assert frames == n * sessions
    assert after["sessions_per_batch_max"] >= 2
    assert batches < frames / max(1, n // 2)  # merged: fewer passes than per-session requests
    assert after["fps_capacity"] > 0 and after["realtime_factor"] > 0


def test_inference_queue_is_bounded(model, avatar):
    eng = MuseTalkEngine(settings(model, musetalk_queue_frames=4, batch_max=1,
                                  batch_wait_ms=100, musetalk_deadline_ms=5000))
    eng.load()
    try:
        eng.prepare_avatar(avatar)
        key = avatar.engine_data["musetalk"]["key"]
        due = time.monotonic() + 60
        meta = {"session": 1, "avatar": key, "offset": 0, "n_valid": None,
                "frames": [[k, "idle", 0, due] for k in range(3)]}
        pcm = np.zeros(eng.window_samples, np.int16)
        first = eng.runner.submit(meta, pcm, 3)
        with pytest.raises(RateLimitExceeded):  # 3 + 3 frames > 4 slots: refused at once
            eng.runner.submit({**meta, "session": 2}, pcm, 3)
        assert first.result(timeout=60).shape == (3, 256, 256, 3)
        assert eng.runner.submit(meta, pcm, 3).result(timeout=60).shape == (3, 256, 256, 3)
    finally:
        asyncio.run(eng.aclose())


def test_logmel_matches_the_whisper_feature_extractor():
    """Our torch log-mel must equal transformers' WhisperFeatureExtractor, or real weights
    would see different inputs than they were trained on."""
    from transformers import WhisperFeatureExtractor

    from websocket_service.engines.musetalk.audio import LogMel

    fe = WhisperFeatureExtractor(feature_size=80)
    audio = (speech(50).astype(np.float32) / 32768.0)
    ref = fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]  # padded to 30 s
    padded = np.zeros(fe.n_samples, np.float32)
    padded[: len(audio)] = audio
    ours = LogMel(fe.mel_filters, fe.n_fft, fe.hop_length, fe.n_samples, torch.device("cpu"))(
        torch.from_numpy(padded)).numpy()
    assert ours.shape == ref.shape == (80, 3000)
    assert np.abs(ours - ref).max() < 1e-3


def test_unloadable_parsing_weights_fall_back_to_the_geometric_mask(model, tmp_path):
    """The parser only refines the mask: a file that does not load must not stop start-up."""
    import shutil

    root = tmp_path / "m"
    shutil.copytree(model, root)
    bad = root / "face-parse-bisent" / "79999_iter.pth"
    bad.parent.mkdir(exist_ok=True)
    torch.save({"unexpected.weight": torch.zeros(3)}, bad)
    eng = MuseTalkEngine(settings(root))
    eng.load()
    info = eng.info()
    assert info["loaded"] and info["mask"].startswith("geometric")
    assert "79999_iter.pth" in info["warnings"][0]
    asyncio.run(eng.aclose())
