"""Media tracks that play a session's output to a WebRTC peer.

Both tracks are stamped from the session's single timeline, never from a wall clock:
video frame n has pts ``n * 90000 / fps`` at 90 kHz and the audio for the same frame
starts at ``n * 640`` at 16 kHz, so the browser's RTCP-based lip sync lines them up.
``recv()`` only pulls from a tiny :class:`~..channel.DropOldest` that the session's pacer
fills, or, for an H.264 peer, from the session feed's outbox (the encoder's bytes, sent as
they are: no base64 on this path); a peer that reads too slowly loses the oldest frames,
counted in the session's statistics (``frames_dropped_by_reader``).
"""

from __future__ import annotations

import weakref
from fractions import Fraction
from typing import TypeVar

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..channel import ChannelClosed, DropOldest
from ..engines.base import SAMPLE_RATE, SAMPLES_PER_FRAME
from ..feed import Outbox
from ..media.encoder import video_frame
from ..session import OutputFrame, Session

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = Fraction(1, SAMPLE_RATE)
# aiortc's Opus encoder stamps every packet of one encode() call with the first packet's
# timestamp, so audio leaves here in 20 ms pieces: exactly one Opus packet each.
AUDIO_PIECE = SAMPLE_RATE // 50
VIDEO_QUEUE = 2
AUDIO_QUEUE = 4 * SAMPLES_PER_FRAME // AUDIO_PIECE

T = TypeVar("T")


async def _next(queue: DropOldest[T]) -> T:
    """``queue``'s next item; MediaStreamError (aiortc's "track ended") once it is closed."""
    try:
        return await queue.get()
    except ChannelClosed:
        raise MediaStreamError from None


class SessionVideoTrack(MediaStreamTrack):
    """The avatar's video. For an H.264 peer, the session's own encoded packets (the feed's,
    shared with every other reader: no encode per peer; see :meth:`use_packets`); for a VP8
    peer, frames that aiortc encodes."""

    kind = "video"

    def __init__(self, session: Session, account: bool = True) -> None:
        super().__init__()
        # weak: aiortc's sender keeps the track in reference cycles of its own after the
        # peer closes; the session must not wait for the garbage collector with it
        self._session = weakref.ref(session)
        #: count sent and dropped frames in the session's statistics (not for viewers)
        self.account = account
        self.queue: DropOldest[OutputFrame] = DropOldest(VIDEO_QUEUE)
        self._ticks = VIDEO_CLOCK // session.video.fps
        self.packets: Outbox | None = None

    def use_packets(self, outbox: Outbox) -> None:
        """Send the feed's H.264 packets from now on (``outbox`` is subscribed to it)."""
        self.packets = outbox
        self.queue.close()

    def push(self, frame: OutputFrame) -> None:
        if self.packets is not None:
            return
        dropped = self.queue.put(frame)  # counted in self.queue.dropped too
        if dropped and self.account and (session := self._session()) is not None:
            session.stats.frames_dropped_by_reader(dropped)

    def _sent(self, frame: OutputFrame) -> None:
        if self.account and (session := self._session()) is not None:
            session.frame_sent(frame, session.clock.now())

    async def recv(self) -> av.VideoFrame | av.Packet:
        if self.packets is not None:
            return await self._next_packet(self.packets)
        f = await _next(self.queue)
        vf = video_frame(f.image)  # RGB or I420 (the MuseTalk engine's speech frames)
        vf.pts = f.index * self._ticks
        vf.time_base = VIDEO_TIME_BASE
        self._sent(f)
        return vf

    async def _next_packet(self, outbox: Outbox) -> av.Packet:
        item = await outbox.next_frame()
        assert item.frame is not None
        pkt = av.Packet(item.data)
        pkt.pts = item.frame.index * self._ticks
        pkt.time_base = VIDEO_TIME_BASE
        pkt.is_keyframe = item.keyframe
        self._sent(item.frame)
        return pkt

    def stop(self) -> None:
        self.queue.close()
        self.packets = None  # the outbox holds the session
        super().stop()


class SessionAudioTrack(MediaStreamTrack):
    """The speech the avatar is lip-syncing (``OutputFrame.pcm``), silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: DropOldest[tuple[int, np.ndarray]] = DropOldest(AUDIO_QUEUE)  # .dropped

    def push(self, frame: OutputFrame) -> None:
        start = frame.index * SAMPLES_PER_FRAME
        for off in range(0, SAMPLES_PER_FRAME, AUDIO_PIECE):
            self.queue.put((start + off, frame.pcm[off:off + AUDIO_PIECE]))

    async def recv(self) -> av.AudioFrame:
        pts, pcm = await _next(self.queue)
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1),
                                        format="s16", layout="mono")
        af.sample_rate = SAMPLE_RATE
        af.pts = pts
        af.time_base = AUDIO_TIME_BASE
        return af

    def stop(self) -> None:
        self.queue.close()
        super().stop()
