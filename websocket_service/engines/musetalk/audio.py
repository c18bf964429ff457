"""Audio features for MuseTalk: Whisper log-mel, the encoder's 5 hidden states, per-frame windows.

Timing (16 kHz): one Whisper frame is 20 ms (320 samples), one video frame 40 ms (640 samples),
so video frame ``f`` sits on Whisper frames ``2f, 2f+1``. Frame ``f`` takes the padded Whisper
frames ``[2f, 2f+10)`` with 4 zero frames on the left, i.e. the real frames ``[2f-4, 2f+6)``:
audio from ``40f-80`` ms to ``40f+120`` ms.

The encoder runs on a window of the utterance, not on 30 s: in ``short`` mode the positional
embedding is cut to the window's length; ``full`` mode zero-pads the audio to the encoder's full
window (3000 mel frames for Whisper), as the original does for a whole clip.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...units import SAMPLES_PER_FRAME

WHISPER_HOP = 320  # samples per encoder frame (mel hop 160, conv stride 2)
LEFT_PAD = 4  # zero Whisper frames before the first one
WINDOW = 10  # Whisper frames per video frame
#: video frames after a frame's own slot whose audio it needs: the window ends at 40f+120 ms and
#: the last encoder frame (2f+5) also sees ~13 ms beyond that through the STFT and the two convs
AUDIO_LOOKAHEAD_FRAMES = 3


def frame_window(feats: torch.Tensor, f: int, offset: int = 0, n_valid: int | None = None
                 ) -> torch.Tensor:
    """The audio tokens of video frame ``f``: [WINDOW * L, D], time-major.

    ``feats`` [T, L, D] holds Whisper frames ``offset .. offset+T-1`` (absolute indices in the
    utterance). Frames before 0, at or after ``n_valid`` (the utterance's length in Whisper frames,
    when known) or outside ``feats`` read as zeros: that is the 4-left / 12-right zero padding.
    """
    t, layers, dim = feats.shape
    out = feats.new_zeros((WINDOW, layers, dim))
    lo_abs = 2 * f - LEFT_PAD
    hi_abs = lo_abs + WINDOW
    if n_valid is not None:
        hi_abs = min(hi_abs, n_valid)
    lo, hi = max(lo_abs, offset, 0), min(hi_abs, offset + t)
    if hi > lo:
        out[lo - lo_abs: hi - lo_abs] = feats[lo - offset: hi - offset]
    return out.reshape(WINDOW * layers, dim)


def positional_encoding(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sinusoidal table [length, dim]: sin on even dims, cos on odd dims."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    div = torch.pow(base, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos / div)
    pe[:, 1::2] = torch.cos(pos / div[: dim // 2])
    return pe.float()


class LogMel:
    """Whisper's log-mel spectrogram in torch, with the feature extractor's parameters."""

    def __init__(self, mel_filters: np.ndarray, n_fft: int, hop: int, n_samples: int,
                 device: torch.device) -> None:
        self.filters = torch.as_tensor(np.asarray(mel_filters, np.float32), device=device)
        self.n_fft, self.hop, self.n_samples = n_fft, hop, n_samples
        self.window = torch.hann_window(n_fft, device=device)

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """[samples] or [batch, samples] float in [-1, 1] -> [(batch,) n_mels, samples // hop].

        Each row is normalised against its own maximum, as if computed alone."""
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        spec = spec[..., :-1]
        # re² + im²: a third of the time of abs() ** 2 on a CPU (abs of a complex tensor takes
        # a square root that the square then undoes), equal to within float rounding
        power = spec.real.square() + spec.imag.square()
        mel = self.filters.T @ power
        log = torch.clamp(mel, min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0


class WhisperStates:
    """The encoder's embedding output and every layer's output: [T, layers+1, D] per window.

    The last state is layer-normed, like the encoder's final output. Works on any length up to
    the encoder's ``max_source_positions`` (the positional table is sliced).
    """

    def __init__(self, encoder: Any, logmel: LogMel, mode: str) -> None:
        self.encoder = encoder
        self.logmel = logmel
        self.mode = mode
        self.max_frames = encoder.embed_positions.weight.shape[0]
        params = inspect.signature(encoder.layers[0].forward).parameters
        self._head_mask_arg = "layer_head_mask" in params  # transformers 4.x layer signature

    @property
    def n_layers(self) -> int:
        return len(self.encoder.layers) + 1

    def __call__(self, pcm: np.ndarray) -> torch.Tensor:
        """int16 PCM (a multiple of 320 samples, at most 30 s) -> [len // 320, L, D] float32."""
        return self.batch(pcm[None])[0]

    def batch(self, pcm: np.ndarray) -> torch.Tensor:
        """[B, samples] int16 windows of one length -> [B, samples // 320, L, D] float32: one
        encoder call for every window (each row equals the window encoded alone)."""
        n = pcm.shape[1] // WHISPER_HOP
        if n > self.max_frames:
            raise ValueError(f"audio window of {n} encoder frames > {self.max_frames}")
        dev = self.logmel.filters.device
        audio = torch.as_tensor(pcm.astype(np.float32) / 32768.0, device=dev)
        if self.mode == "full":
            audio = F.pad(audio, (0, self.logmel.n_samples - audio.shape[1]))
        mel = self.logmel(audio)
        dtype = self.encoder.conv1.weight.dtype
        states = self._encode(mel.to(dtype))
        return states[:, :n].float()

    def _encode(self, mel: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        states = [x]
        for layer in enc.layers:
            out = layer(x, None, None) if self._head_mask_arg else layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
            states.append(x)
        states[-1] = enc.layer_norm(x)
        return torch.stack(states, dim=2)


def fixed_window_samples(context_samples: int, hop: int, max_samples: int) -> int:
    """The one window length every encoder pass uses: the left context plus a hop of frames and
    their look-ahead, in whole encoder frames, at most ``max_samples``. One length for every
    session and every pass is what lets one call (and one captured graph) serve them all."""
    want = context_samples + (hop + AUDIO_LOOKAHEAD_FRAMES) * SAMPLES_PER_FRAME
    want = math.ceil(want / WHISPER_HOP) * WHISPER_HOP
    return min(want, max_samples - max_samples % WHISPER_HOP)


def fixed_window(last_frame: int, received: int, ended: bool, length: int) -> tuple[int, int]:
    """Sample range [start, end) of length ``length`` (a multiple of 320) whose end serves
    ``last_frame``'s look-ahead (the whole window when the utterance has ended: up to its end,
    rounded up to an encoder frame, but not before the frame's own slot); ``start`` is negative
    at the start of an utterance, where the window is zero-padded on the left (frames before 0 read as zeros in
    :func:`frame_window` anyway)."""
    need_end = (last_frame + 1 + AUDIO_LOOKAHEAD_FRAMES) * SAMPLES_PER_FRAME
    end = min(received, need_end) if ended else need_end
    end = max(end, (last_frame + 1) * SAMPLES_PER_FRAME)
    end = math.ceil(end / WHISPER_HOP) * WHISPER_HOP
    return end - length, end
