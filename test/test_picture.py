"""Pictures as RGB or I420 (media/picture.py), and the MuseTalk blend straight into I420."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from websocket_service.avatars.model import BaseFrame
from websocket_service.avatars.store import build_avatar
from websocket_service.config import Settings
from websocket_service.cursor import Cursor
from websocket_service.engines.musetalk import MuseTalkEngine
from websocket_service.engines.musetalk.stream import BaseI420, blend, blend_i420, mask_rect
from websocket_service.media.encoder import video_frame
from websocket_service.media.picture import frame_size, is_i420, resize_to, to_i420, to_rgb
from websocket_service.pipecat.service import image_frame

from .musetalk_tiny import Bases, render_all, small_avatar, speech


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    return cv2.GaussianBlur(noise, (5, 5), 2)


def test_sizes_conversions_and_resizing() -> None:
    y, x = np.mgrid[0:48, 0:64]
    img = np.dstack([x * 4, y * 5, (x + y) * 2]).astype(np.uint8)  # smooth: chroma survives
    yuv = to_i420(img)
    assert is_i420(yuv) and not is_i420(img) and yuv.shape == (72, 64)
    assert frame_size(yuv) == frame_size(img) == (64, 48)
    assert to_i420(yuv) is yuv and to_rgb(img) is img
    assert np.abs(to_rgb(yuv).astype(int) - img).mean() < 2  # BT.601 there and back
    dst = np.empty_like(yuv)
    assert to_i420(img, dst=dst) is dst and np.array_equal(dst, yuv)
    assert to_i420(yuv, dst=dst) is dst and np.array_equal(dst, yuv)
    assert resize_to(yuv, 64, 48) is yuv
    small = resize_to(yuv, 32, 24)  # other sizes go through RGB
    assert small.shape == (24, 32, 3)
    assert np.abs(small.astype(int) - cv2.resize(img, (32, 24), interpolation=cv2.INTER_AREA)
                  ).mean() < 2


def test_an_i420_picture_reaches_webrtc_and_pipecat_as_the_same_picture() -> None:
    img = rgb(48, 64, 1)
    yuv = to_i420(img)
    vf = video_frame(yuv)
    assert (vf.format.name, vf.width, vf.height) == ("yuv420p", 64, 48)
    assert np.array_equal(vf.to_ndarray(), yuv)
    assert video_frame(img).format.name == "rgb24"
    frame = image_frame(yuv)
    assert frame.size == (64, 48) and frame.format == "RGB"
    assert frame.image == to_rgb(yuv).tobytes()


def _case(rng: np.random.Generator, hard: bool, empty: bool):
    """A random frame (even size), face box anywhere in it (odd corners too) and mask."""
    h, w = 2 * int(rng.integers(30, 90)), 2 * int(rng.integers(30, 90))
    bw, bh = int(rng.integers(6, w // 2)), int(rng.integers(6, h // 2))
    x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    mask = np.zeros((bh, bw), np.uint8)
    r0, c0 = int(rng.integers(0, bh)), int(rng.integers(0, bw))
    r1, c1 = int(rng.integers(r0 + 1, bh + 1)), int(rng.integers(c0 + 1, bw + 1))
    if not empty:
        soft = rng.integers(0, 256, (r1 - r0, c1 - c0), np.uint8)
        mask[r0:r1, c0:c1] = 255 if hard else soft
    face = rng.integers(0, 256, (64, 64, 3), np.uint8)
    return rgb(h, w, int(rng.integers(1 << 30))), face, np.array([x1, y1, x1 + bw, y1 + bh]), mask


def test_blend_into_i420_is_the_rgb_blend_converted_byte_for_byte() -> None:
    rng = np.random.default_rng(7)
    for k in range(150):
        image, face, box, mask = _case(rng, hard=k % 3 == 0, empty=k % 10 == 0)
        want = cv2.cvtColor(blend(image, face, box, mask), cv2.COLOR_RGB2YUV_I420)
        base = to_i420(image)
        got = blend_i420(base, image, face, box, mask, mask_rect(mask))
        assert np.array_equal(got, want), k
        assert got is not base and np.array_equal(base, to_i420(image))  # base untouched
        assert np.array_equal(blend_i420(base, image, face, box, mask), want)  # rect found


@pytest.fixture(scope="module")
def avatar():
    return build_avatar("a", [skdata.astronaut()], True, 128, 128)


def test_base_frames_are_kept_in_i420_up_to_the_budget(avatar) -> None:
    clip = avatar.clip("idle")
    frame_bytes = 128 * 128 * 3 // 2
    cache = BaseI420(avatar, budget=3 * frame_bytes)
    seen = [cache.get(BaseFrame("idle", i, clip.frames[i])) for i in range(5)]
    for i, yuv in enumerate(seen[:3]):
        assert yuv is not None and np.array_equal(yuv, to_i420(clip.frames[i]))
    assert seen[3:] == [None, None]  # past the budget: blended in RGB and converted whole
    assert cache.used == 3 * frame_bytes
    assert cache.get(BaseFrame("idle", 1, clip.frames[1])) is seen[1]
    # a copy of the frame's picture is not the avatar's frame: never kept
    copy = clip.frames[3].copy()
    other = BaseI420(avatar)
    assert other.get(BaseFrame("idle", 3, copy)) is None and other.used == 0
    got = other.get(BaseFrame("idle", 3, clip.frames[3]))
    assert got is not None and np.array_equal(got, to_i420(clip.frames[3]))
    assert other.used == frame_bytes


def test_a_crossfaded_action_frame_is_not_taken_from_the_cache(avatar) -> None:
    """During an action's crossfade the base frame's picture blends the action's frame with
    the loop's: its (clip, index) names the action frame, its picture is not that frame."""
    action = avatar.actions[0]
    cursor = Cursor(avatar, "idle", crossfade=2)
    cursor.pos = 12  # the loop away from the pose the action starts in
    cursor.start_action(action)
    first = cursor.next()
    assert (first.clip, first.index) == (action, 0)
    own = avatar.clip(action).frames[0]
    assert not np.array_equal(first.image, own)  # crossfaded
    cache = BaseI420(avatar)
    assert cache.get(BaseFrame(action, 0, own)) is not None  # the action's own frame, kept
    assert cache.get(first) is None


@pytest.fixture
def torch_threads():
    """The stand-in's core sets this process's torch threads to 1 when it runs in-process: put
    them back, or a later test comparing in-process with inference-process arithmetic differs."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_every_speech_frame_is_i420_kept_base_or_not(tmp_path, torch_threads) -> None:
    """A stream's frames are the RGB blend converted, whether the base frame's I420 copy was
    kept (blended in I420) or not (past the budget: blended in RGB, converted whole)."""
    frames = {}
    for budget in (BaseI420.BUDGET, 0):
        eng = MuseTalkEngine(Settings(_env_file=None, engine="musetalk", device="cpu",
                                      model_path=Path("/nonexistent"), gpu_standin="h100",
                                      musetalk_process=False))
        eng.load()
        try:
            av = small_avatar(tmp_path / f"a{budget}")
            eng.prepare_avatar(av)
            av.engine_data["musetalk"]["i420"].budget = budget

            async def run(av=av, eng=eng):
                stream = eng.open_stream(av)
                stream.push_audio(speech(5))
                stream.end_segment()
                return await render_all(stream, Bases(av))

            frames[budget] = asyncio.run(run())
            assert (av.engine_data["musetalk"]["i420"].used > 0) == (budget > 0)
        finally:
            asyncio.run(eng.aclose())
    kept, converted = frames[BaseI420.BUDGET], frames[0]
    assert len(kept) == len(converted) == 5
    for a, b in zip(kept, converted, strict=True):
        assert is_i420(a.image) and is_i420(b.image)
        assert np.array_equal(a.image, b.image)
