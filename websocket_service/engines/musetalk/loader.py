"""Load MuseTalk's components from the official download layout under MODEL_PATH.

Every size comes from the config files next to the weights. Nothing is ever fetched: all
loading is from local paths, and a missing or unreadable file raises ModelNotFound naming it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelNotFound
from .parsing import BiSeNet, n_classes_of

log = logging.getLogger(__name__)

UNET_FILES = {"v15": ("musetalkV15", "musetalk.json", "unet.pth"),
              "v10": ("musetalk", "musetalk.json", "pytorch_model.bin")}
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WHISPER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
PARSING_FILE = Path("face-parse-bisent") / "79999_iter.pth"


@dataclass
class Bundle:
    """The loaded models, all in eval mode on one device."""

    unet: Any
    vae: Any
    encoder: Any
    whisper_config: Any
    feature_extractor: Any
    parsing: BiSeNet | None
    device: torch.device
    dtype: torch.dtype
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _missing(path: Path, what: str) -> ModelNotFound:
    return ModelNotFound(f"MuseTalk {what} not found: {path}", {"file": str(path)}, fatal=True)


def _broken(path: Path, exc: Exception) -> ModelNotFound:
    return ModelNotFound(f"MuseTalk weight file {path} could not be loaded: {exc}",
                         {"file": str(path), "error": str(exc)[:300]}, fatal=True)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise _missing(path, what)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _broken(path, exc) from exc


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file, whatever the reader raises
        raise _broken(path, exc) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _broken(path, TypeError("not a state dict"))
    return state


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _broken(path, exc) from exc


def _first(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise _missing(folder / names[-1], what)


def load_unet(root: Path, version: str) -> tuple[Any, dict[str, str]]:
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    sub, cfg_name, weights = UNET_FILES[version]
    cfg_path, w_path = root / sub / cfg_name, root / sub / weights
    config = _read_json(cfg_path, "UNet config")
    if not w_path.is_file():
        raise _missing(w_path, "UNet weights")
    try:
        unet = UNet2DConditionModel.from_config(config)
    except Exception as exc:  # a config diffusers rejects
        raise _broken(cfg_path, exc) from exc
    state = _state_dict(w_path)
    prefix = "unet."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    _load_strict(unet, state, w_path)
    return unet, {"unet_config": str(cfg_path), "unet": str(w_path)}


def load_vae(root: Path) -> tuple[Any, dict[str, str]]:
    from diffusers import AutoencoderKL  # noqa: PLC0415

    folder = root / "sd-vae"
    _read_json(folder / "config.json", "VAE config")
    w_path = _first(folder, VAE_WEIGHTS, "VAE weights")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True,
                                            use_safetensors=w_path.suffix == ".safetensors")
    except Exception as exc:  # diffusers raises many kinds for a bad checkpoint
        raise _broken(w_path, exc) from exc
    return vae, {"vae": str(w_path)}


def load_whisper(root: Path) -> tuple[Any, Any, Any, dict[str, str]]:
    from transformers import WhisperConfig, WhisperFeatureExtractor  # noqa: PLC0415
    from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: PLC0415

    folder = root / "whisper"
    cfg_path = folder / "config.json"
    _read_json(cfg_path, "Whisper config")
    w_path = _first(folder, WHISPER_WEIGHTS, "Whisper weights")
    try:
        config = WhisperConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise _broken(cfg_path, exc) from exc
    if (folder / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    else:  # the defaults are Whisper's; only the mel count comes from the model config
        fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    state = _state_dict(w_path)
    enc_state = {k.split("encoder.", 1)[1]: v for k, v in state.items()
                 if k.startswith(("model.encoder.", "encoder."))}
    if not enc_state:
        raise _broken(w_path, KeyError("no encoder.* weights in the file"))
    encoder = WhisperEncoder(config)
    _load_strict(encoder, enc_state, w_path)
    return encoder, config, fe, {"whisper": str(w_path)}


def load_parsing(root: Path) -> tuple[BiSeNet | None, dict[str, str], list[str]]:
    """The optional face parser. It only refines the blending mask, so a file that does not
    load is reported (``parsing_error`` in /health) and the geometric mask is used instead of
    failing start-up."""
    path = root / PARSING_FILE
    if not path.is_file():
        return None, {}, []
    try:
        state = _state_dict(path)
        try:
            net = BiSeNet(n_classes_of(state))
        except KeyError as exc:
            raise _broken(path, exc) from exc
        _load_strict(net, state, path)
    except ModelNotFound as exc:
        log.warning("face parsing disabled, using the geometric mask: %s", exc.message)
        return None, {}, [f"face parsing disabled: {exc.message[:300]}"]
    return net, {"parsing": str(path)}, []


def load_bundle(root: Path, version: str, device_setting: str, use_float16: bool) -> Bundle:
    """All components, moved to the device; fp16 on CUDA when ``use_float16``."""
    if not root.is_dir():
        raise _missing(root, "model folder (MODEL_PATH)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local paths only
    unet, files = load_unet(root, version)
    vae, f2 = load_vae(root)
    encoder, wcfg, fe, f3 = load_whisper(root)
    parsing, f4, warnings = load_parsing(root)
    bundle = make_bundle(unet, vae, encoder, wcfg, fe, parsing, device_setting, use_float16,
                         {**files, **f2, **f3, **f4})
    bundle.warnings.extend(warnings)
    return bundle


def make_bundle(unet, vae, encoder, wcfg, fe, parsing, device_setting: str, use_float16: bool,
                files: dict[str, str]) -> Bundle:
    """Models moved to the device, in eval mode; fp16 on CUDA when ``use_float16``."""
    device = pick_device(device_setting)
    dtype = torch.float16 if (device.type == "cuda" and use_float16) else torch.float32
    for m in (unet, vae, encoder):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if parsing is not None:
        parsing.to(device).eval().requires_grad_(False)
    return Bundle(unet, vae, encoder, wcfg, fe, parsing, device, dtype, files)
