"""The per-batch network of MuseTalk (UNet + latent decoder) and the optional tiny decoder.

``MUSETALK_DECODER=sd-vae`` (default) decodes with the SD-VAE that also encodes the avatar
latents: upstream quality, ~620 GFLOP per 256x256 frame (78 % of a frame's work).
``MUSETALK_DECODER=taesd`` decodes with TAESD (diffusers ``AutoencoderTiny``, ~35 GFLOP per frame):
it decodes standard SD-1 latents, which sd-vae-ft-mse's are (only that VAE's decoder was
fine-tuned), so the avatar latents still come from the SD-VAE encoder. It blurs fine detail
(teeth, lips): a quality trade-off, never the default. It is loaded only from
``MODEL_PATH/taesd/`` and never downloaded; a missing folder or file is a fatal start-up error
naming it, because silently falling back to the SD-VAE would change the capacity the operator
planned for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from ...errors import ModelNotFound
from .loader import VAE_WEIGHTS, _broken, _first, _read_json

DecoderKind = Literal["sd-vae", "taesd"]
DECODERS = ("sd-vae", "taesd")
TAESD_DIR = "taesd"
LATENT_CHANNELS = 4  # SD-1 latents: what the UNet predicts and the SD-VAE encodes


def load_taesd(model_path: Path, device: torch.device | str, dtype: torch.dtype) -> Any:
    """diffusers ``AutoencoderTiny`` from ``model_path/taesd`` (local files only), in eval mode on
    ``device``. ModelNotFound (fatal, ``{"file": path}``) when the folder, its config or its
    weights are missing, unreadable, or not a 4-channel SD-1 decoder."""
    from diffusers import AutoencoderTiny  # noqa: PLC0415  (heavy; only the engine needs it)

    folder = Path(model_path) / TAESD_DIR
    if not folder.is_dir():
        raise ModelNotFound(
            f"MuseTalk tiny decoder folder not found: {folder} (MUSETALK_DECODER=taesd needs "
            "diffusers AutoencoderTiny weights there, e.g. madebyollin/taesd; nothing is "
            "downloaded)", {"file": str(folder)}, fatal=True)
    config = _read_json(folder / "config.json", "tiny decoder (TAESD) config")
    w_path = _first(folder, VAE_WEIGHTS, "tiny decoder (TAESD) weights")
    if config.get("latent_channels", LATENT_CHANNELS) != LATENT_CHANNELS:
        raise _broken(folder / "config.json", ValueError(
            f"latent_channels {config.get('latent_channels')}: MuseTalk needs an SD-1 TAESD "
            f"({LATENT_CHANNELS} latent channels)"))
    try:
        model = AutoencoderTiny.from_pretrained(str(folder), local_files_only=True,
                                                use_safetensors=w_path.suffix == ".safetensors")
    except Exception as exc:  # diffusers raises many kinds for a bad checkpoint
        raise _broken(w_path, exc) from exc
    if not isinstance(model, torch.nn.Module):  # from_pretrained may return (model, info)
        raise _broken(w_path, TypeError(f"not a model: {type(model).__name__}"))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _device_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def make_unet(unet: Any, pe: torch.Tensor,
              scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The UNet's part of a batch, for :class:`BucketRunner`: ``unet_fn(latents [b, 8, h, w],
    audio [b, tokens, dim])`` -> the decoder's input latents [b, 4, h, w] on the device: the
    UNet at timestep 0 with ``audio + pe`` as cross-attention states, divided by ``scale`` (the
    decoder's scaling factor: sd-vae 0.18215, TAESD 1.0). Tensors the function needs (``pe``,
    the timestep) are made once here: creating them per call would be a host-to-device copy
    inside a captured graph."""
    device, dtype = _device_dtype(unet)
    pe = pe.to(device, dtype)
    t = torch.zeros((), device=device, dtype=torch.long)
    scale = float(scale)

    def unet_fn(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return unet(latents, t, encoder_hidden_states=audio + pe).sample / scale

    return unet_fn


def make_decode(decoder: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decoder's part, for :class:`BucketRunner`: ``decode_fn(latents [b, 4, h, w])`` ->
    uint8 images [b, 8h, 8w, 3] on the device ([-1, 1] -> [0, 255]), contiguous: one plain
    copy to the host."""

    def decode_fn(latents: torch.Tensor) -> torch.Tensor:
        images = decoder.decode(latents).sample
        images = (images / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous()

    return decode_fn


def make_generate(unet: Any, decoder: Any, pe: torch.Tensor,
                  scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The whole per-batch network as one function of two tensors, for :class:`BucketRunner`
    (the GPU benchmark's whole-batch figures): ``generate(latents, audio)`` =
    ``decode_fn(unet_fn(latents, audio))``, the same arithmetic as the engine's two runners."""
    unet_fn, decode_fn = make_unet(unet, pe, scale), make_decode(decoder)

    def generate(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return decode_fn(unet_fn(latents, audio))

    return generate


def decoder_scale(decoder: Any) -> float:
    """The decoder's latent scaling factor from its config (sd-vae 0.18215, TAESD 1.0)."""
    return float(decoder.config.scaling_factor)
