"""A scaled-down MuseTalk in the official download layout, with random weights.

Same folders, file names, config keys and state-dict keys as the real model; only the sizes are
small so the whole pipeline runs in seconds on a CPU. With what its tests share: speech-like
audio (``speech``), a tiny avatar (``small_avatar``), its bases (``Bases``), ``render_all``.
Usable from any test::

    from musetalk_tiny import write_tiny_model
    model_path = write_tiny_model(tmp_path)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage import data as skdata  # noqa: E402

from websocket_service.avatars.model import Avatar, BaseFrame, Clip  # noqa: E402
from websocket_service.avatars.store import build_avatar, save_avatar  # noqa: E402


def speech(n_frames: int, seed: int = 0) -> np.ndarray:
    """``n_frames`` x 40 ms of 16 kHz int16 speech-like sound: a 180 Hz tone whose loudness
    swings 3 times a second, with a little noise (``seed``)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * 640) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    x = env * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(len(t))
    return (x * 12000).astype(np.int16)


UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 8,
    "out_channels": 4,
    "sample_size": 32,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 384,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

WHISPER_CONFIG = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 256,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 32,
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 3,
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
}


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def write_tiny_model(root: Path, versions: tuple[str, ...] = ("v15",), parsing: bool = False,
                     seed: int = 0) -> Path:
    """Write the tiny model under ``root`` (created) and return ``root``.

    ``versions``: which UNet layouts to write ("v15": musetalkV15/unet.pth, "v10":
    musetalk/pytorch_model.bin). ``parsing`` also writes a random face-parsing net.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    unet = UNet2DConditionModel(**{k: v for k, v in UNET_CONFIG.items() if k != "_class_name"})
    for version in versions:
        sub, weights = ("musetalkV15", "unet.pth") if version == "v15" else ("musetalk", "pytorch_model.bin")
        (root / sub).mkdir(exist_ok=True)
        (root / sub / "musetalk.json").write_text(json.dumps(UNET_CONFIG, indent=1))
        torch.save(unet.state_dict(), root / sub / weights)

    vae = AutoencoderKL(**VAE_CONFIG)
    vae.save_pretrained(root / "sd-vae", safe_serialization=False)

    wcfg = WhisperConfig(**WHISPER_CONFIG)
    whisper = WhisperForConditionalGeneration(wcfg)
    (root / "whisper").mkdir(exist_ok=True)
    wcfg.save_pretrained(root / "whisper")
    torch.save(whisper.state_dict(), root / "whisper" / "pytorch_model.bin")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")

    if parsing:
        from websocket_service.engines.musetalk.parsing import BiSeNet

        (root / "face-parse-bisent").mkdir(exist_ok=True)
        torch.save(BiSeNet(19).state_dict(), root / "face-parse-bisent" / "79999_iter.pth")
    return root


def copy_without(src: Path, dst: Path, relative: str) -> Path:
    """A copy of a model folder with one file removed (for missing-file tests)."""
    shutil.copytree(src, dst)
    (dst / relative).unlink()
    return dst


SIZE = 256  # the tiny avatar's frame size


def small_avatar(root: Path, frames: int = 3) -> Avatar:
    """A tiny avatar (the astronaut, two clips of ``frames`` frames), saved under ``root``."""
    av = build_avatar("tiny", [skdata.astronaut()], True, SIZE, SIZE)
    av.clips = {n: Clip(n, c.kind, c.frames[:frames].copy()) for n, c in list(av.clips.items())[:2]}
    save_avatar(av, root)
    return av


class Bases:
    """take_base for one clip of the avatar, cycling, recording what it handed out."""

    def __init__(self, avatar: Avatar, clip: str = "idle") -> None:
        self.clip = avatar.clip(clip)
        self.given: list[BaseFrame] = []

    def __call__(self) -> BaseFrame:
        i = len(self.given) % len(self.clip)
        b = BaseFrame(self.clip.name, i, self.clip.frames[i])
        self.given.append(b)
        return b


async def render_all(stream, bases, max_frames: int = 4) -> list:
    """Every frame ``stream`` has ready, rendered ``max_frames`` at a time."""
    out = []
    while stream.ready_frames():
        out += await stream.render_next(bases, max_frames)
    return out


if __name__ == "__main__":
    import sys

    print(write_tiny_model(Path(sys.argv[1]), ("v15", "v10"), parsing="--parsing" in sys.argv))
