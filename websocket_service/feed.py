"""Encode once, send to many: one feed per session, one outbox per reader.

``SessionFeed`` is the session's encoded output, for every transport. It keeps the session's
frames and events in order on a :class:`~.channel.DropOldest` (frames drop-oldest *before*
encoding, counted; events never dropped), encodes each frame once (or copies it from a shared
pre-encoded idle loop) and hands the same :class:`Item` (the access unit as bytes, its keyframe
flag and frame) to every subscribed :class:`Outbox` (the owner's WebSocket, viewers, a WebRTC
peer's video track) and to every recorder. Adding a reader adds no encode.

Only a WebSocket reader needs the protocol's text. :attr:`Item.text` makes a frame's message
(base64 and JSON: :mod:`.frame_text`) when a WebSocket outbox first sends it, once, and
every other WebSocket reader of that item sends the same string: a session read only over
WebRTC or only recorded never base64-encodes.

Each ``Outbox`` is one reader's bounded send queue. A reader that falls behind loses frames
there, and then every frame up to the next keyframe (at most one GOP, one second), so what it
does receive still decodes; it never slows the feed or the other readers. Events are never
dropped. Whether a client reads is judged by its socket, not by how many replies wait: while
``REPLY_HIGH_WATER`` events wait for a connection, it reads no more of its client's messages
(:meth:`Outbox.make_room`), so a client that floods and reads is slowed by TCP, never dropped;
one that takes nothing from its socket for ``SEND_STALL_S`` meanwhile is not reading and is
disconnected, and so is any whose events pile up past ``MAX_PENDING_EVENTS`` (e.g. a viewer far
behind its session's owner). The module imports no transport: a WebSocket is anything with an
async ``send_text`` (:class:`TextSocket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import numpy as np

from .channel import DropOldest
from .errors import ProcessingError, ServiceError
from .events import SessionEvent
from .frame_text import Templates, live_text, loop_text
from .manager import Services
from .media.encoder_pool import EncoderPool, InProcessEncoder, PoolEncoder, open_encoder
from .media.loops import EncodedLoop, LoopCache, LoopKey
from .media.recorder import Recorder
from .playout import OutputFrame
from .protocol import CloseAckData, ServerMessage
from .session import Session
from .wire import event_message

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 256
REPLY_HIGH_WATER = 64  # events waiting for a connection before it stops reading its client
MAX_ENCODE_BATCH = 8  # frames one live-encode call may take (a feed catching up)


class Overflow(Exception):
    """The client is so far behind that even control events pile up."""


class TextSocket(Protocol):
    """What an :class:`Outbox` sends to: a WebSocket (Starlette's, for one)."""

    async def send_text(self, data: str) -> None: ...


class Item:
    """One message for the feed's readers, shared by every outbox that receives it.

    An event carries its text. A frame carries its access unit (``data``, bytes, as the
    encoder made it), keyframe flag and frame; its WebSocket text is made by ``make`` on the
    first read of :attr:`text` and kept for the other readers (a frame is not changed once
    emitted, so it is the text it would have been at once).
    """

    __slots__ = ("_make", "_text", "data", "frame", "is_error", "keyframe")

    def __init__(self, text: str | None = None, frame: OutputFrame | None = None,
                 keyframe: bool = False, *, is_error: bool = False, data: bytes = b"",
                 make: Callable[[], str] | None = None) -> None:
        self._text, self._make = text, make
        self.frame = frame  # None: an event
        self.keyframe = keyframe
        self.is_error = is_error
        self.data = data

    @property
    def text(self) -> str:
        """The message as the WebSocket sends it (for a frame: made now if no reader has)."""
        if self._text is None:
            assert self._make is not None, "an item has its text or a way to make it"
            self._text, self._make = self._make(), None
        return self._text


class Outbox:
    """One reader's send queue: bounded for frames, events kept. Not a
    :class:`~.channel.DropOldest`: a reader that falls behind drops every queued frame and then
    each one up to the next keyframe, because a stream missing only its oldest frame would not
    decode until the next keyframe anyway."""

    def __init__(self, session: Session, max_frames: int) -> None:
        self.session = session
        self.max_frames = max_frames
        self._items: deque[Item] = deque()
        self._frames = 0
        self._events = 0
        self._skip_to_key = True  # a new reader starts at a keyframe
        self._finished = False
        self._wake = asyncio.Event()
        self.sent = 0
        self.dropped = 0
        self.bytes = 0
        self.started = session.clock.now()
        self.delays: deque[float] = deque(maxlen=100)  # frame made -> handed to this reader
        self._last_send = self.started  # or when the queue last stopped being empty
        self._moved = asyncio.Event()  # set on every put and send: make_room looks again
        #: called (once) when events pile up past MAX_PENDING_EVENTS: the sender may be stuck
        #: in a send that never completes, where it cannot see that itself
        self.on_overflow: Callable[[], None] | None = None

    @property
    def pending_events(self) -> int:
        return self._events

    def put(self, item: Item) -> None:
        if not self._items:
            self._last_send = self.session.clock.now()  # the wait for the reader starts now
        self._moved.set()
        if item.frame is not None:
            if self._skip_to_key and not item.keyframe:
                self._drop()
                return
            self._skip_to_key = False
            if self._frames >= self.max_frames:
                self._shed()
                if not item.keyframe:
                    self._drop()
                    return
            self._frames += 1
        else:
            self._events += 1
            if self._events > MAX_PENDING_EVENTS and self.on_overflow is not None:
                overflow, self.on_overflow = self.on_overflow, None
                overflow()
        self._items.append(item)
        self._wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        self.session.stats.frames_dropped_by_reader()

    def _shed(self) -> None:
        """Behind: drop every queued frame and wait for the next keyframe."""
        kept: deque[Item] = deque()
        for it in self._items:
            if it.frame is None:
                kept.append(it)
            else:
                self._drop()
        self._items, self._frames, self._skip_to_key = kept, 0, True

    def event(self, msg: ServerMessage) -> None:
        """A message for this connection only (a reply to its own request)."""
        self.put(Item(msg.to_json(), is_error=msg.type == "ERROR"))

    async def next_frame(self) -> Item:
        """The next frame (events are skipped): for readers that are not WebSocket connections,
        e.g. a WebRTC track that sends the packets as they are."""
        while True:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._items.popleft()
            if item.frame is None:
                self._events -= 1
                continue
            self._frames -= 1
            self.sent += 1
            self.bytes += len(item.data)
            self.delays.append(self.session.clock.now() - item.frame.created)
            return item

    def finish(self, msg: ServerMessage) -> None:
        """Send ``msg`` after what is queued, then :meth:`run` returns."""
        self.event(msg)
        self._finished = True
        self._wake.set()

    async def run(self, ws: TextSocket) -> None:
        """Send until cancelled. Raises Overflow if events pile up past their bound."""
        s = self.session
        while True:
            if not self._items:
                if self._finished:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._events > MAX_PENDING_EVENTS:
                raise Overflow
            item = self._items.popleft()
            if item.frame is not None:
                self._frames -= 1
            else:
                self._events -= 1
                if item.is_error:
                    s.stats.error_sent()
            await ws.send_text(item.text)
            self._last_send = s.clock.now()
            self._moved.set()
            self.sent += item.frame is not None
            self.bytes += len(item.text)
            if item.frame is not None:
                f = item.frame
                s.stats.frame_sent(f.audio_arrival, f.created, s.clock.now(), len(item.text))
                self.delays.append(s.clock.now() - f.created)

    async def make_room(self, backlog: Callable[[], int], stall_s: float) -> None:
        """Return once fewer than ``REPLY_HIGH_WATER`` events wait for this reader (``backlog``
        counts them, those still on their way in the feed too); the caller reads no more client
        messages until then. Raises Overflow if meanwhile nothing was taken from the socket for
        ``stall_s``: the client is not reading."""
        while backlog() >= REPLY_HIGH_WATER:
            waited = self.session.clock.now() - self._last_send
            if self._items and waited >= stall_s:
                raise Overflow
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(stall_s - waited if self._items else stall_s):
                    await self._moved.wait()

    async def drain(self, ws: TextSocket, timeout: float = 2.0) -> None:
        """Send the events still queued (frames are dropped), e.g. before closing."""
        events = [i for i in self._items if i.frame is None]
        self._items.clear()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                for ev in events:
                    await ws.send_text(ev.text)


class SessionFeed:
    """The session's encoded output, once for all its readers (every transport's).

    Plain idle-loop frames come from the shared pre-encoded loop (``loops``) when it is ready:
    entered at one of its IDRs, left by forcing an IDR on the live encoder. A frame missing
    (skipped by the pacer or dropped before encoding) does not leave it: the loop goes on from
    the packet sent last, so the stream always decodes in order and costs no encode, and
    catches up with the session's cursor at its next IDR. While the loop is being built, a
    session that may not encode live (``LoopCache.claim_live``) sends nothing for those frames.
    """

    def __init__(self, session: Session, max_frames: int, loops: LoopCache | None,
                 registry: dict[str, SessionFeed]) -> None:
        self.session = session
        self.registry = registry  # where connections find a session's feed
        self.max_frames = max_frames
        self.loops = loops
        self.outboxes: list[Outbox] = []
        self.recorders: list[Recorder] = []
        self.encoder: PoolEncoder | InProcessEncoder | None = None
        self._copying: tuple[LoopKey, int] | None = None  # (loop, last position sent)
        self._live_ok: LoopKey | None = None  # may encode this loop's frames live while it builds
        self._waiting: LoopKey | None = None  # sends nothing until this loop's next IDR
        #: a copied frame's message text in pieces, per (clip, state, keyframe): see loop_text
        self._templates: Templates = {}
        #: raw frames (at most max_frames: the oldest is dropped) and events, to encode in order
        self._queue: DropOldest[OutputFrame | SessionEvent | ServiceError] = DropOldest(
            max_frames, droppable=_is_frame)
        self._busy = False  # the feed's task holds an item it has not handed on yet
        self._task: asyncio.Task[None] | None = None

    async def open(self, pool: EncoderPool | None) -> None:
        """Open the encoder (in ``pool``'s processes, or in-process), start, attach."""
        v = self.session.video
        try:
            self.encoder = await open_encoder(pool, v.width, v.height, v.fps, v.bitrate,
                                              v.gop_frames)
        except ValueError as exc:
            raise ProcessingError(f"cannot encode this video size: {exc}") from None
        self._task = asyncio.create_task(self._run(), name=f"ws-feed-{self.session.session_id[:8]}")
        self.session.add_sink(self)
        self.session.stats.feed_opened(self.describe)
        self.registry[self.session.session_id] = self

    async def aclose(self) -> None:
        """The session is closing (an attachment of it): readers are told, then :meth:`close`."""
        self.finish("session_closed")
        await self.close()

    @property
    def pending_events(self) -> int:
        """Events queued here, not yet handed to the outboxes."""
        return len(self._queue) - self._queue.waiting

    @property
    def idle(self) -> bool:
        """Nobody reads or records it."""
        return not self.outboxes and not self.recorders

    async def close(self) -> None:
        for rec in self.recorders:
            rec.stop()
        if self.registry.get(self.session.session_id) is self:
            del self.registry[self.session.session_id]
        self.session.stats.feed_closed()
        self.session.remove_sink(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.encoder is not None:
            await self.encoder.close()
        self._queue.close()
        while self._queue:
            self._queue.get_nowait()
        self.outboxes.clear()

    def subscribe(self, outbox: Outbox) -> None:
        self.outboxes.append(outbox)
        self.session.stats.readers_changed(len(self.outboxes))
        self.request_keyframe()  # a new reader starts decoding at once

    def unsubscribe(self, outbox: Outbox) -> None:
        with contextlib.suppress(ValueError):
            self.outboxes.remove(outbox)
        self.session.stats.readers_changed(len(self.outboxes))

    def finish(self, reason: str) -> None:
        """The session is over: every reader gets CLOSE_ACK ``reason`` after its queue."""
        for box in self.outboxes:
            box.finish(ServerMessage(type="CLOSE_ACK", session_id=self.session.session_id,
                                     data=CloseAckData(reason=reason)))

    def request_keyframe(self) -> None:
        self._copying = None  # the live encoder's next frame is an IDR
        if self.encoder is not None:
            self.encoder.request_keyframe()

    # ------------------------------------------------------------------ SessionSink
    def on_frame(self, frame: OutputFrame) -> None:
        if not self._queue and not self._busy and (copied := self._from_loop(frame)) is not None:
            # a copied loop frame with nothing ahead of it goes out at once: no hop through
            # the feed's task (most frames of an idle session; the event loop's work per frame)
            self.session.stats.loop_frame_copied()
            self._deliver([self._loop_item(frame, *copied)])
            return
        if dropped := self._queue.put(frame):  # encoding fell behind: the oldest raw frame went
            self.session.stats.frames_dropped_before_encoding(dropped)

    def on_event(self, event: SessionEvent | ServiceError) -> None:
        self._queue.put(event)  # never dropped

    # ------------------------------------------------------------------ encoding
    async def _run(self) -> None:
        s = self.session
        while True:
            item = await self._queue.get()
            self._busy = True  # until its output is handed on: on_frame must not overtake it
            outs: list[Item]
            if isinstance(item, OutputFrame):
                outs = await self._encode(item)
            else:
                msg = event_message(s.session_id, item, s.avatar.names)
                outs = [Item(msg.to_json(), is_error=msg.type == "ERROR")]
            self._deliver(outs)
            self._busy = False

    def _deliver(self, outs: list[Item]) -> None:
        for out in outs:
            for box in list(self.outboxes):
                box.put(out)
            if out.frame is not None:
                for rec in list(self.recorders):
                    rec.put(out.data, out.keyframe, out.frame.pcm)  # the bytes: no text made

    async def _encode(self, f: OutputFrame) -> list[Item]:
        """``f``'s item; a live encode also takes the frames queued right behind it that
        need one, in one call (one thread hop): a feed that fell behind catches up at once."""
        assert self.encoder is not None
        s = self.session
        copied = self._from_loop(f)
        if copied is not None:
            s.stats.loop_frame_copied()
            return [self._loop_item(f, *copied)]
        if self._awaits_loop(f):
            s.stats.loop_frame_withheld()
            return []
        if self._copying is not None:  # back to live: a fresh closed GOP
            self._copying = None
            self.encoder.request_keyframe()
        batch = [f]
        while (len(batch) < MAX_ENCODE_BATCH and self._queue
               and isinstance(head := self._queue.peek(), OutputFrame)
               and self._loop_packet(head) is None):
            self._queue.get_nowait()
            batch.append(head)
        try:
            encoded = await self.encoder.encode_many([g.image for g in batch])
        except ProcessingError as err:  # e.g. an encoder process died: the next is a keyframe
            log.warning("session %s: %s", s.session_id, err.message)
            self.on_event(err)
            return []
        s.stats.frames_encoded_live(len(batch))
        return [self._item(g, enc.data, enc.keyframe)
                for g, enc in zip(batch, encoded, strict=True)]

    def _item(self, f: OutputFrame, data: bytes, keyframe: bool) -> Item:
        """A live-encoded frame's item: its text, when a WebSocket reader asks, is
        ``frame_message``'s."""
        s = self.session
        return Item(frame=f, keyframe=keyframe, data=data,
                    make=partial(live_text, s.session_id, s.avatar.names, f, data, keyframe))

    def _loop_item(self, f: OutputFrame, loop: EncodedLoop, p: int, keyframe: bool) -> Item:
        """A copied loop frame's item: packet ``p`` of ``loop``; its text, when a WebSocket
        reader asks, comes from a template (see :func:`.frame_text.loop_text`)."""
        s = self.session
        return Item(frame=f, keyframe=keyframe, data=loop.packets[p],
                    make=partial(loop_text, self._templates, s.session_id, s.avatar.names, f,
                                 loop, p, keyframe))

    def _from_loop(self, f: OutputFrame) -> tuple[EncodedLoop, int, bool] | None:
        """The shared loop and position of ``f``'s packet when it may be copied (loop,
        position, keyframe)."""
        found = self._loop_packet(f)
        if found is None:
            return None
        pos, loop, keyframe = found
        self._copying, self._waiting = pos, None
        return loop, pos[1], keyframe

    def _loop_key(self, f: OutputFrame) -> LoopKey:
        return LoopKey.of(self.session.avatar.avatar_id, f.clip, self.session.video)

    def _loop_packet(self, f: OutputFrame
                     ) -> tuple[tuple[LoopKey, int], EncodedLoop, bool] | None:
        """(copy position, loop, keyframe) of ``f``'s packet in a shared loop, when the
        stream may take it: at a keyframe of the loop, or, while copying that loop, the packet
        after the one sent last (the same as ``f``'s unless frames went missing). No state
        changes."""
        if self.loops is None or f.loop_pos is None:
            return None
        key = self._loop_key(f)
        loop = self.loops.get(key, self.session.avatar.clip(f.clip).frames)
        if loop is None:
            return None
        p = f.loop_pos % loop.period
        prev = self._copying
        if prev is not None and prev[0] == key and not loop.keyframe[p]:
            p = (prev[1] + 1) % loop.period
        elif not loop.keyframe[p]:
            return None
        return (key, p), loop, loop.keyframe[p]

    def _awaits_loop(self, f: OutputFrame) -> bool:
        """``f`` is a plain loop frame whose loop is being built, and enough sessions already
        encode such frames live: this one sends nothing until the loop is there, and then
        until its next IDR (under a second), rather than encode live meanwhile."""
        if self.loops is None or f.loop_pos is None:
            return False
        key = self._loop_key(f)
        if key == self._live_ok:
            return False
        if not self.loops.claim_live(key):
            self._waiting = key
            return True
        if self._waiting == key and self.loops.has(key):
            return True
        self._waiting = None
        self._live_ok = key
        return False

    def add_recorder(self, rec: Recorder) -> None:
        self.recorders.append(rec)
        self.request_keyframe()  # the file starts at once

    def remove_recorder(self, rec: Recorder) -> None:
        with contextlib.suppress(ValueError):
            self.recorders.remove(rec)

    def describe(self) -> list[dict[str, Any]]:
        """Per connection: frames sent and dropped, and the rate it has been receiving."""
        now = self.session.clock.now()
        return [{"sent": b.sent, "dropped": b.dropped,
                 "fps": round(b.sent / max(now - b.started, 1e-3), 2),
                 "kbit_s": round(b.bytes * 8 / 1000 / max(now - b.started, 1e-3), 1),
                 "latency_ms": round(1000 * float(np.median(b.delays)), 1) if b.delays else None}
                for b in self.outboxes]


def _is_frame(item: OutputFrame | SessionEvent | ServiceError) -> bool:
    return isinstance(item, OutputFrame)


async def ensure_feed(services: Services, session: Session) -> SessionFeed:
    """The session's feed, opened (and attached to the session, closed with it) if needed."""
    feed: SessionFeed | None = services.feeds.get(session.session_id)
    if feed is None:
        feed = SessionFeed(session, services.settings.send_queue_frames, services.loops,
                           services.feeds)
        await feed.open(services.encoders)
        services.sessions.attach(session.session_id, feed)
    return feed


async def release_feed(services: Services, feed: SessionFeed) -> None:
    """Close ``feed`` if nobody reads or records it any more."""
    if feed.idle:
        services.sessions.detach(feed.session.session_id, feed)
        await feed.close()
