"""Avatar preparation for MuseTalk: crop boxes, masked/reference latents and blending masks.

The original finds a landmark-based box per frame (x from the jaw line, bottom at the chin, top
as far above the nose as the chin is below it). We have no landmarks: the box is derived from
the avatar's face box (``meta['face_box']``, a Haar box from brows to chin) with fixed ratios,
and follows the face from frame to frame by phase correlation (translation only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .parsing import lower_face_from_labels, parse_labels

CROP = 256  # MuseTalk's face crop side; latents are CROP / VAE downsampling
NOSE_RATIO = 0.62  # nose tip, as a fraction of the Haar box height from its top
CHIN_RATIO = 1.0  # chin
CONTEXT_SCALE = 1.5  # context box side / max(crop w, crop h)
BLUR_RATIO = 0.1  # Gaussian kernel / context width
ENCODE_BATCH = 8


@dataclass
class ClipData:
    """Per-frame MuseTalk data of one clip."""

    boxes: np.ndarray  # (N, 4) int x1, y1, x2, y2 of the crop in avatar pixels
    context: np.ndarray  # (N, 4) int context box the mask was shaped in
    latents: torch.Tensor  # (N, 8, h, w) masked + reference latents, already scaled
    masks: list[np.ndarray]  # N x (y2-y1, x2-x1) uint8 alpha of the generated pixels


def crop_box(face: list[int] | tuple[int, ...], version: str, extra_margin: int, bbox_shift: int,
             size: tuple[int, int]) -> tuple[int, int, int, int]:
    """MuseTalk-style crop (x1, y1, x2, y2) from a face box [x, y, w, h], clamped to the image."""
    x, y, w, h = (float(v) for v in face)
    chin = y + CHIN_RATIO * h
    nose = y + NOSE_RATIO * h + (bbox_shift if version == "v10" else 0)
    y1 = nose - (chin - nose)
    y2 = chin + (extra_margin if version == "v15" else 0)
    width, height = size
    x1, x2 = max(0, round(x)), min(width, round(x + w))
    y1, y2 = max(0, round(y1)), min(height, round(y2))
    if x2 - x1 < 8 or y2 - y1 < 8:
        raise ValueError(f"face box {face} gives an empty crop")
    return x1, y1, x2, y2


def track_shifts(frames: np.ndarray, ref: np.ndarray, face: list[int]) -> np.ndarray:
    """(N, 2) integer translation of the face region of each frame relative to ``ref``."""
    x, y, w, h = (int(v) for v in face)
    H, W = ref.shape[:2]
    x1, y1 = max(0, x - w // 2), max(0, y - h // 2)
    x2, y2 = min(W, x + w + w // 2), min(H, y + h + h // 2)
    win = cv2.createHanningWindow((x2 - x1, y2 - y1), cv2.CV_64F)

    def patch(img: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(img[y1:y2, x1:x2], cv2.COLOR_RGB2GRAY).astype(np.float64)

    ref_p = patch(ref)
    out = np.zeros((len(frames), 2), np.int64)
    limit = max(w, h) / 4
    for i, frame in enumerate(frames):
        (dx, dy), response = cv2.phaseCorrelate(ref_p, patch(frame), win)
        if response > 0.05 and abs(dx) < limit and abs(dy) < limit:
            out[i] = round(dx), round(dy)
    return out


def shifted(box: tuple[int, int, int, int], d: np.ndarray, size: tuple[int, int]
            ) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    dx = int(np.clip(d[0], -x1, size[0] - x2))
    dy = int(np.clip(d[1], -y1, size[1] - y2))
    return x1 + dx, y1 + dy, x2 + dx, y2 + dy


def context_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = CONTEXT_SCALE * max(x2 - x1, y2 - y1) / 2
    return (max(0, round(cx - half)), max(0, round(cy - half)),
            min(size[0], round(cx + half)), min(size[1], round(cy + half)))


def geometric_region(ctx_shape: tuple[int, int], box_in_ctx: tuple[int, int, int, int]) -> np.ndarray:
    """A lower-face ellipse (uint8 0/255) in context coordinates: mouth, chin and jaw."""
    x1, y1, x2, y2 = box_in_ctx
    mask = np.zeros(ctx_shape, np.uint8)
    w, h = x2 - x1, y2 - y1
    centre = (round((x1 + x2) / 2), round(y1 + 0.70 * h))
    cv2.ellipse(mask, centre, (round(0.44 * w), round(0.34 * h)), 0, 0, 360, 255, -1)
    return mask


def finish_mask(region: np.ndarray, box_in_ctx: tuple[int, int, int, int]) -> np.ndarray:
    """Restrict to the crop's lower half (inset by the blur radius), blur, cut to the crop box.

    Everything above the crop's middle row is exactly 0, so the upper face is never touched.
    """
    x1, y1, x2, y2 = box_in_ctx
    ctx_w = region.shape[1]
    k = max(3, int(BLUR_RATIO * ctx_w) // 2 * 2 + 1)
    r = k // 2
    mid = (y1 + y2) // 2
    keep = np.zeros_like(region)
    keep[mid + r: max(mid + r, y2 - r), x1 + r: max(x1 + r, x2 - r)] = 255
    mask = cv2.GaussianBlur(cv2.min(region, keep), (k, k), 0)
    mask[:mid] = 0
    return np.ascontiguousarray(mask[y1:y2, x1:x2])


def frame_mask(image: np.ndarray, box: tuple[int, int, int, int], parsing, device, version: str
               ) -> tuple[tuple[int, int, int, int], np.ndarray]:
    size = (image.shape[1], image.shape[0])
    ctx = context_box(box, size)
    cx1, cy1, cx2, cy2 = ctx
    inner = (box[0] - cx1, box[1] - cy1, box[2] - cx1, box[3] - cy1)
    shape = (cy2 - cy1, cx2 - cx1)
    if parsing is not None:
        labels = parse_labels(parsing, image[cy1:cy2, cx1:cx2], device)
        region = lower_face_from_labels(labels, version)
    else:
        region = geometric_region(shape, inner)
    return ctx, finish_mask(region, inner)


def crop_images(frames: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """(N, CROP, CROP, 3) uint8 Lanczos-resized crops."""
    return np.stack([cv2.resize(f[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_LANCZOS4)
                     for f, (x1, y1, x2, y2) in zip(frames, boxes, strict=True)])


@torch.inference_mode()
def encode_latents(vae, crops: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[N, 8, h, w] float16 on CPU: masked (lower half black) then reference latents, scaled."""
    scale = float(vae.config.scaling_factor)
    out = []
    for i in range(0, len(crops), ENCODE_BATCH):
        x = torch.as_tensor(crops[i: i + ENCODE_BATCH], device=device).permute(0, 3, 1, 2)
        x = x.to(dtype) / 127.5 - 1.0
        masked = x.clone()
        masked[:, :, CROP // 2:] = -1.0
        both = vae.encode(torch.cat([masked, x])).latent_dist.mode() * scale
        n = len(x)
        out.append(torch.cat([both[:n], both[n:]], dim=1).to("cpu", torch.float16))
    return torch.cat(out)


def cache_key(avatar_meta: dict, files: dict[str, int], vae_config: dict, settings: dict) -> str:
    """Changes whenever anything that shapes the cached data changes."""
    blob = json.dumps({"face": avatar_meta.get("face_box"), "created": avatar_meta.get("created"),
                       "files": sorted(files.items()), "vae": {k: v for k, v in vae_config.items()
                                                        if not k.startswith("_")},
                       "settings": settings, "format": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
