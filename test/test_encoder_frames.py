"""The encoder's input frames: I420 bytes copied into PyAV's planes, whatever their padding."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from websocket_service.media.encoder import H264Encoder, i420_frame


@pytest.mark.parametrize(("width", "height"), [(512, 512), (500, 376), (640, 360), (2, 2), (34, 18)])
def test_planes_hold_the_same_pixels_as_from_ndarray(width: int, height: int) -> None:
    rgb = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    frame = i420_frame(yuv, width, height)
    assert (frame.width, frame.height, frame.format.name) == (width, height, "yuv420p")
    want = av.VideoFrame.from_ndarray(yuv, format="yuv420p").to_ndarray()
    np.testing.assert_array_equal(frame.to_ndarray(), want)


def test_padded_rows_do_not_leak_into_the_picture() -> None:
    # 500 wide: PyAV pads each luma row to 512 bytes and each chroma row to 256
    yuv = np.full((376 * 3 // 2, 500), 77, np.uint8)
    frame = i420_frame(yuv, 500, 376)
    assert frame.planes[0].line_size > 500
    assert (frame.to_ndarray() == 77).all()


@pytest.mark.parametrize("bad", [np.zeros((768, 511), np.uint8), np.zeros((767, 512), np.uint8),
                                 np.zeros((768, 512), np.int16)])
def test_a_wrong_shape_or_type_is_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="I420 512x512"):
        i420_frame(bad, 512, 512)


def test_encoded_frames_decode_to_the_input() -> None:
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, :48] = (200, 40, 40)
    rgb[:, 48:] = (30, 160, 220)
    enc = H264Encoder(96, 64, bitrate=2_000_000)
    dec = av.CodecContext.create("h264", "r")
    got = []
    for _ in range(3):
        got += dec.decode(av.Packet(enc.encode(rgb).data))
    assert got, "the decoder returned no picture"
    out = got[-1].to_ndarray(format="rgb24").astype(int)
    assert abs(out[:, 4:44] - rgb[:, 4:44]).mean() < 6
    assert abs(out[:, 52:92] - rgb[:, 52:92]).mean() < 6
