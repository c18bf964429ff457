"""Rendering: nose line untouched, feathered edges, action clips, determinism, end to end."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from bench.mouth_metrics import evaluate, mouth_opening
from bench.run_stream import base_cycle, speak
from websocket_service.avatars.model import BaseFrame
from websocket_service.engines.geometric.fields import MouthPose
from websocket_service.engines.geometric.geometry import CX, CY, NOSE_Y, WIDTH
from websocket_service.engines.geometric.stream import GeometricStream

from .geometric_support import builtin, engine, wav

POSES = [MouthPose(1.0, 0.0), MouthPose(1.0, 1.0), MouthPose(1.0, -1.0), MouthPose(0.4, 0.5)]


def _frame(clip: str, index: int) -> BaseFrame:
    return BaseFrame(clip, index, builtin().clips[clip].frames[index])


def test_pixels_above_the_nose_never_change():
    avatar, eng = builtin(), engine()
    x, y, w, h = avatar.meta["face_box"]
    for clip, index in [("idle", 0), ("idle", 30), ("nod", 12), ("tilt", 15), ("shake", 8)]:
        base = _frame(clip, index)
        nose = int(eng.geometry(avatar, base)[NOSE_Y])
        assert nose > y + 0.55 * h  # the nose line is below the eyes
        for pose in POSES:
            out = eng.render(avatar, base, pose)
            assert np.array_equal(out[:nose], base.image[:nose]), (clip, index, pose)
            assert not np.array_equal(out, base.image)


def test_closed_pose_returns_the_base_frame():
    base = _frame("idle", 5)
    out = engine().render(builtin(), base, MouthPose(0.0, 0.0))
    assert np.array_equal(out, base.image) and out is not base.image


def test_open_mouth_shows_a_dark_cavity_where_the_mouth_is():
    avatar, eng = builtin(), engine()
    for clip, index in [("idle", 0), ("nod", 12), ("tilt", 15)]:
        base = _frame(clip, index)
        g = eng.geometry(avatar, base)
        box = [g[CX] - g[WIDTH] / 2, g[CY] - 0.6 * g[WIDTH], g[WIDTH], g[WIDTH]]
        shut = mouth_opening(base.image, box)
        half = mouth_opening(eng.render(avatar, base, MouthPose(0.5, 0.0)), box, base.image)
        wide = mouth_opening(eng.render(avatar, base, MouthPose(1.0, 0.0)), box, base.image)
        assert shut < 0.05 and 0.02 < half < wide, (clip, shut, half, wide)


def test_no_box_edge_changes_are_feathered_to_zero():
    avatar, eng = builtin(), engine()
    base = _frame("tilt", 15)
    out = eng.render(avatar, base, MouthPose(1.0, 1.0)).astype(int)
    diff = np.abs(out - base.image.astype(int)).max(axis=2)
    ys, xs = np.nonzero(diff)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    # along the bounding box of all changes, changes are small: no hard edge anywhere
    ring = np.concatenate([diff[y0, x0:x1], diff[y1, x0:x1], diff[y0:y1, x0], diff[y0:y1, x1]])
    assert ring.max() <= 6
    # and the change fades in: the mean difference grows from the edge inwards
    assert diff[y0:y1, x0:x0 + 3].mean() < diff[y0:y1, x0 + 30:x0 + 33].mean() + 1


def test_ee_spreads_and_oo_rounds_the_mouth():
    avatar, eng = builtin(), engine()
    base = _frame("idle", 0)

    def cavity_aspect(pose):
        """Width / height of the dark cavity: columns with cavity over their tallest run."""
        dark = eng.render(avatar, base, pose).max(axis=2) < 60
        dark &= base.image.max(axis=2) >= 60
        per_column = dark.sum(axis=0)
        return (per_column >= 2).sum() / max(1, per_column.max())

    assert cavity_aspect(MouthPose(0.7, 1.0)) > cavity_aspect(MouthPose(0.7, -1.0)) * 1.3


def test_same_audio_gives_identical_frames():
    pcm = wav("short_16k.wav")
    a = speak(engine(), builtin(), pcm)
    b = speak(engine(), builtin(), pcm, chunk=777)  # chunking of the input does not matter
    assert len(a) == len(b) == 30
    for fa, fb in zip(a, b, strict=True):
        assert np.array_equal(fa.image, fb.image)


def test_stream_reproduces_loudness_and_closes_in_pauses():
    avatar = builtin()
    pcm = wav("speech_pauses_16k.wav")
    frames = speak(engine(), avatar, pcm)
    assert len(frames) == -(-len(pcm) // 640) and frames[-1].last
    m = evaluate([f.image for f in frames], pcm, avatar.meta["face_box"],
                 [f.base.image for f in frames])
    assert m["r"] >= 0.6, m
    assert m["silence_ratio"] < 0.2, m


def test_mouth_shut_three_frames_after_speech():
    pcm = np.concatenate([wav("vowel_ee_16k.wav"), np.zeros(12000, np.int16)])
    frames = speak(engine(), builtin(), pcm)
    loud = [np.abs(pcm[i * 640:(i + 1) * 640].astype(int)).max() > 300 for i in range(len(frames))]
    last = max(i for i, v in enumerate(loud) if v)
    assert not np.array_equal(frames[last - 1].image, frames[last - 1].base.image)
    for f in frames[last + 3:]:
        assert np.array_equal(f.image, f.base.image), f.index


def test_interrupt_makes_a_render_in_flight_return_nothing():
    eng, avatar = engine(), builtin()
    rendering, interrupted = threading.Event(), threading.Event()

    def render(base, pose):  # noqa: ANN001, ANN202 - the engine's own render, held mid-way
        rendering.set()
        assert interrupted.wait(30)
        return eng.render(avatar, base, pose)

    async def run():
        stream = GeometricStream(render, eng.lookahead_frames, time.monotonic)
        stream.push_audio(wav("short_16k.wav"))
        task = asyncio.ensure_future(stream.render_next(base_cycle(avatar), 25))
        assert await asyncio.to_thread(rendering.wait, 30)  # the render is in its worker thread
        stream.interrupt()
        interrupted.set()
        first = await task
        stream.push_audio(wav("short_16k.wav")[:6400])
        stream.end_segment()
        after = await stream.render_next(base_cycle(avatar), 25)
        return first, after

    first, after = asyncio.run(run())
    assert first == []
    assert len(after) == 10 and after[-1].last


def test_renders_on_action_clips_follow_their_geometry():
    pcm = wav("vowel_oo_16k.wav")
    frames = speak(engine(), builtin(), pcm, clip="nod")
    avatar, eng = builtin(), engine()
    opened = [f for f in frames if f.info["open"] > 0.8]
    assert opened
    for f in opened:
        g = eng.geometry(avatar, f.base)
        box = [g[CX] - g[WIDTH] / 2, g[CY] - 0.6 * g[WIDTH], g[WIDTH], g[WIDTH]]
        assert mouth_opening(f.image, box, f.base.image) > 0.04
