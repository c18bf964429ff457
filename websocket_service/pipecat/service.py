"""What every avatar service in a pipecat pipeline does with TTS frames, local or remote.

* ``TTSAudioRawFrame``: kept as an :class:`~.speech.Utterance` (the original audio, for the
  listener) and handed on at 16 kHz mono to the avatar (:meth:`_speech_in`);
* ``TTSStartedFrame`` passes at once; ``TTSStoppedFrame`` is held until the reply's last
  image is out, so the output transport does not declare the bot silent too early;
* ``InterruptionFrame`` drops every utterance (and tells the avatar), then passes;
* :meth:`_show` pushes one image marked ``sync_with_audio`` and right after it the 40 ms of
  original audio it shows, so the transport switches the picture when that audio starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import abstractmethod
from collections import deque
from typing import Any

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from ..clock import Clock
from ..media.picture import to_rgb
from ..units import SAMPLES_PER_FRAME
from .speech import FPS, Utterance

FRAME_S = 1.0 / FPS
DRAIN_TIMEOUT_S = 30.0  # EndFrame: the longest we wait for buffered speech to be shown


def image_frame(image: np.ndarray) -> OutputImageRawFrame:
    """A picture (RGB or I420, :mod:`..media.picture`) as an RGB pipecat frame that waits for
    the audio queued before it."""
    image = to_rgb(image)
    h, w = image.shape[:2]
    frame = OutputImageRawFrame(image=np.ascontiguousarray(image).tobytes(), size=(w, h),
                                format="RGB")
    frame.sync_with_audio = True
    return frame


class AvatarService(AIService):
    """TTS audio in; images with their audio out. Subclasses connect it to an avatar."""

    def __init__(self, *, clock: Clock | None = None, speech_gap_s: float = 0.3,
                 **kwargs: Any) -> None:
        kwargs.setdefault("settings", ServiceSettings(model=None))
        super().__init__(**kwargs)
        self.clock = clock or Clock()
        self.speech_gap_s = speech_gap_s
        self._utts: deque[Utterance] = deque()
        self._epoch = 0
        self._speech_until = 0.0  # estimated end of playout of the speech pushed so far
        self._last_audio = 0.0
        self._samples_out = 0  # 16 kHz samples handed to the avatar, all utterances
        self._drained = asyncio.Event()
        #: counters for tests and logs
        self.speech_images = 0
        self.idle_images = 0

    # ------------------------------------------------------------------ the avatar side
    @property
    @abstractmethod
    def ready(self) -> bool:
        """The avatar is set up (frames before that pass through untouched)."""

    @abstractmethod
    async def _shutdown(self) -> None:
        """Stop the avatar's tasks and free what it holds (idempotent)."""

    async def stop(self, frame: EndFrame) -> None:
        """Graceful end: finish the open utterance and show what is buffered, then stop."""
        await super().stop(frame)
        if self.ready:
            await self._drain(DRAIN_TIMEOUT_S)
        await self._shutdown()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._shutdown()

    @abstractmethod
    async def _speech_in(self, pcm: np.ndarray) -> None:
        """Give 16 kHz mono samples of the current utterance to the avatar."""

    @abstractmethod
    async def _speech_end(self) -> None:
        """The current utterance is complete."""

    @abstractmethod
    async def _speech_interrupt(self) -> None:
        """Drop everything the avatar buffered."""

    # ------------------------------------------------------------------ frames in
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not self.ready or direction is not FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame):
            await self._add_audio(frame)
        elif isinstance(frame, TTSStartedFrame):
            await self._end_utterance()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStoppedFrame):
            await self._stop_utterance(frame)
        elif isinstance(frame, InterruptionFrame):
            await self.interrupt()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def interrupt(self) -> None:
        """Drop buffered speech; the next image is idle."""
        self._epoch += 1
        self._utts.clear()
        self._drained.set()
        self._speech_until = 0.0
        await self._speech_interrupt()

    def _open(self) -> Utterance | None:
        return self._utts[-1] if self._utts and not self._utts[-1].ended else None

    async def _add_audio(self, frame: TTSAudioRawFrame) -> None:
        utt = self._open()
        if utt is not None and (utt.rate, utt.channels) != (frame.sample_rate, frame.num_channels):
            await self._end_utterance()
            utt = None
        if utt is None:
            utt = Utterance(frame.sample_rate, frame.num_channels, frame.context_id,
                            offset=self._samples_out)
            self._utts.append(utt)
        await self._to_avatar(utt, await utt.add(frame.audio))
        self._last_audio = self.clock.now()

    async def _to_avatar(self, utt: Utterance, pcm: np.ndarray) -> None:
        if len(pcm):
            await self._speech_in(pcm)
            utt.engine_samples += len(pcm)
            self._samples_out += len(pcm)

    async def _end_utterance(self) -> None:
        utt = self._open()
        if utt is None:
            return
        await self._to_avatar(utt, await utt.finish())
        if utt.engine_samples == 0:  # no audio at all: nothing will show it
            self._utts.remove(utt)
            await self._pass_stop(utt)
        else:
            await self._speech_end()

    async def _end_if_quiet(self, now: float) -> None:
        """End an utterance the TTS left open (no TTSStoppedFrame) after a gap."""
        if self._open() is not None and now - self._last_audio > self.speech_gap_s:
            await self._end_utterance()

    async def _stop_utterance(self, frame: TTSStoppedFrame) -> None:
        utt = self._utts[-1] if self._utts else None
        if utt is None or utt.stopped is not None:
            await self.push_frame(frame)
            return
        utt.stopped = frame
        await self._end_utterance()

    async def _pass_stop(self, utt: Utterance) -> None:
        if utt.stopped is not None:
            await self.push_frame(utt.stopped)
        if not self._utts:
            self._drained.set()

    async def _drain(self, timeout: float) -> None:
        """End the open utterance and wait (at most ``timeout``) until all speech is out."""
        await self._end_utterance()
        if self._utts:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)

    # ------------------------------------------------------------------ frames out
    @property
    def speaking(self) -> bool:
        """Speech is buffered, or pushed and (by the estimate) still playing."""
        return bool(self._utts) or self.clock.now() < self._speech_until

    async def _show(self, utt: Utterance, image: np.ndarray, sample: int) -> None:
        """Push ``image`` and the 40 ms of ``utt`` from 16 kHz sample ``sample`` on.

        An interruption while pushing (the input task runs between our awaits) stops it.
        """
        epoch = self._epoch
        await self.push_frame(image_frame(image))
        if epoch != self._epoch:
            return
        await self.push_frame(TTSAudioRawFrame(utt.audio_at(sample), utt.rate, utt.channels,
                                               context_id=utt.context_id))
        if epoch != self._epoch:
            return
        self.speech_images += 1
        self._speech_until = max(self.clock.now(), self._speech_until) + FRAME_S
        if utt.ended and sample + SAMPLES_PER_FRAME >= utt.engine_samples:
            while self._utts and self._utts[0] is not utt:
                self._utts.popleft()  # earlier ones the avatar did not show to the end
            if self._utts:
                self._utts.popleft()
            await self._pass_stop(utt)

    async def _show_idle(self, image: np.ndarray) -> None:
        await self.push_frame(image_frame(image))
        self.idle_images += 1
