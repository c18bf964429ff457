"""Size checks of avatar sources from their headers, before anything is decoded.

A 100 kB PNG can declare 30000 x 30000 pixels (2.7 GB once decoded). Pillow's lazy
``Image.open`` reads only an image's header, PyAV's ``av.open`` only a video's container and
stream headers, so the size is known, and refused, before a pixel is allocated:
:func:`check_source` raises :class:`InvalidMessage` (400) naming the limit
(``MAX_IMAGE_PIXELS``) when ``width * height`` is over it, and :class:`ProcessingError` when the
header cannot be read at all (what cannot be measured is not decoded either).

The REST routes call it before they answer 202, and the preparation job calls it again before
it decodes (the file is read again there, and a server-side file may have changed). A video's
frames are checked once more as they are decoded (a stream may change size midway), in
:func:`~.store.read_source`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidMessage, ProcessingError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def too_big(name: str, width: int | None, height: int | None, max_pixels: int) -> InvalidMessage:
    """The error for a source over ``MAX_IMAGE_PIXELS`` (dimensions when known)."""
    size = f"{width} x {height} pixels" if width and height else "too many pixels"
    return InvalidMessage(f"{name} is {size}; the limit is {max_pixels} pixels (MAX_IMAGE_PIXELS)",
                          {"width": width, "height": height, "max_image_pixels": max_pixels})


def image_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """An image's (width, height) from its header; raise if over ``max_pixels`` or unreadable."""
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own 89 M pixel guard: this module's limit decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # lazy: only the header is read
                width, height = im.size
    except Image.DecompressionBombError:  # past twice Pillow's guard: far over any sane limit
        raise too_big(path.name, None, None, max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ProcessingError(f"could not read image {path.name}: {exc.__class__.__name__}") from None
    if width * height > max_pixels:
        raise too_big(path.name, width, height, max_pixels)
    return width, height


def video_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """A video's first video stream's (width, height) from the container's headers."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProcessingError(f"{path.name} has no video stream")
            ctx = container.streams.video[0].codec_context
            width, height = int(ctx.width), int(ctx.height)
    except av.error.FFmpegError as exc:
        raise ProcessingError(f"could not decode video {path.name}: {exc}") from None
    if width * height > max_pixels:
        raise too_big(path.name, width, height, max_pixels)
    return width, height


def check_source(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an avatar source, image or video; raise if over the pixel limit."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return image_size(path, max_pixels)
    return video_size(path, max_pixels)


__all__ = ["IMAGE_SUFFIXES", "check_source", "image_size", "too_big", "video_size"]
