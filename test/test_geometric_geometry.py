"""Mouth geometry at avatar preparation: built-in avatar, video avatar, missing faces, cache."""

from __future__ import annotations

import time
from pathlib import Path

import av
import cv2
import numpy as np
from skimage import data

from websocket_service.avatars.store import load_avatar
from websocket_service.engines.geometric.geometry import (
    CX,
    CY,
    FACE_FOUND,
    MOUTH_FOUND,
    NOSE_Y,
    WIDTH,
    analyse_clip,
)
from websocket_service.engines.geometric.prepare import CACHE_NAME

from .geometric_support import builtin, engine, store


def _assert_mouth_in_face(rows: np.ndarray, face_box) -> None:
    x, y, w, h = face_box
    assert np.all(np.abs(rows[:, CX] - (x + w / 2)) < 0.15 * w)
    assert np.all((rows[:, CY] > y + 0.6 * h) & (rows[:, CY] < y + 1.05 * h))
    assert np.all((rows[:, WIDTH] > 0.25 * w) & (rows[:, WIDTH] < 0.7 * w))
    assert np.all(rows[:, NOSE_Y] < rows[:, CY] - 0.15 * rows[:, WIDTH])


def test_mouth_found_in_every_frame_of_builtin_avatar():
    avatar = builtin()
    data_ = avatar.engine_data["geometric"]
    assert set(data_["geometry"]) == set(avatar.clips)
    for name, rows in data_["geometry"].items():
        assert len(rows) == len(avatar.clips[name])
        assert rows[:, FACE_FOUND].all() and rows[:, MOUTH_FOUND].all(), name
        _assert_mouth_in_face(rows, avatar.meta["face_box"])
    # the astronaut's mouth: centred under the nose, around (256, 280-300) at 512x512
    idle = data_["geometry"]["idle"]
    assert abs(float(np.median(idle[:, CX])) - 256) < 12
    assert 270 < float(np.median(idle[:, CY])) < 305
    assert data_["report"]["face_missing"] == 0


def test_geometry_follows_action_clips():
    geo = builtin().engine_data["geometric"]["geometry"]
    nod, shake = geo["nod"], geo["shake"]
    assert nod[len(nod) // 2, CY] - nod[0, CY] > 6  # the nod moves the head down ~14 px
    assert np.ptp(shake[:, CX]) > 8  # the shake moves it sideways


def test_cache_on_disk_is_reused():
    avatar = builtin()
    assert (avatar.path / CACHE_NAME).exists()
    again = load_avatar(avatar.path)
    t0 = time.perf_counter()
    engine().prepare_avatar(again)
    assert time.perf_counter() - t0 < 1.0
    report = again.engine_data["geometric"]["report"]
    assert report["cache"] == "loaded"
    for name, rows in avatar.engine_data["geometric"]["geometry"].items():
        assert np.array_equal(rows, again.engine_data["geometric"]["geometry"][name])


def test_frame_without_face_keeps_last_geometry_and_is_reported():
    frames = builtin().clips["idle"].frames[:4].copy()
    frames[2] = 128  # a blank grey frame: no face
    report: dict = {}
    rows = analyse_clip(frames, tuple(builtin().meta["face_box"]), report)
    assert report["face_missing"] == 1
    assert rows[2, FACE_FOUND] == 0 and rows[1, FACE_FOUND] == 1
    assert abs(rows[2, CX] - rows[1, CX]) < 2 and abs(rows[2, CY] - rows[1, CY]) < 2


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_mouth_found_on_avatar_prepared_from_video(tmp_path):
    still = data.astronaut()
    frames = []
    for i in range(16):  # the head drifts right and down, then back
        a = np.sin(np.pi * i / 15)
        m = np.float32([[1, 0, 12 * a], [0, 1, 6 * a]])
        frames.append(cv2.warpAffine(still, m, (512, 512), borderMode=cv2.BORDER_REFLECT_101))
    video = tmp_path / "talk.mp4"
    _write_video(video, frames)
    avatar = store().prepare("from_video", video)
    assert avatar.meta["source"] == "video"
    geo = avatar.engine_data["geometric"]["geometry"]
    idle = geo["idle"]
    assert len(idle) == len(avatar.clips["idle"]) >= 10
    assert idle[:, MOUTH_FOUND].mean() >= 0.9
    _assert_mouth_in_face(idle, avatar.meta["face_box"])
    # the mouth follows the head: the crop is fixed, so the drift shows in the geometry
    assert np.ptp(idle[:, CX]) > 5
    assert (avatar.path / CACHE_NAME).exists()
