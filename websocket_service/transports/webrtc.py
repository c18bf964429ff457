"""The WebRTC transport: one aiortc peer connection bound to one session.

The peer attaches a sink to the session that feeds the two output tracks, answers the
client's offer (H.264 preferred, VP8 fallback), reads the client's audio track into the
session, and reports ``pc.getStats()`` to the session's statistics (``rtc``, through
:class:`~websocket_service.stats.SessionStats` methods). It never calls an engine.
Signaling (``/offer`` and the signaling WebSocket) lives in ``signaling.py``; the limit
on concurrent clients and shutdown live in :class:`RtcHub`.

A *viewer* is a peer attached to a session someone else owns (another client, or a
server-side realtime session): it gets the same frames, is receive-only (its answer sends
and takes no media back, so a viewer's microphone never reaches the session), counts in the
session's ``rtc.viewers`` instead of the owner's statistics, leaves the session running
when it goes, and is closed when the session closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from ..config import Settings
from ..errors import InvalidMessage, ProcessingError, RateLimitExceeded, ServiceError
from ..events import SessionEvent
from ..feed import Outbox, SessionFeed, ensure_feed, release_feed
from ..manager import Services
from ..protocol import VideoConfig
from ..protocol_rtc import Outgoing, SigConnected, SigDisconnected
from ..session import OutputFrame, Session
from ..units import SAMPLE_RATE
from ..wire import event_message, signaling_error
from .rtc_audio_in import MicIngest
from .rtc_network import host_addresses, rtc_configuration
from .rtc_tracks import SessionAudioTrack, SessionVideoTrack

log = logging.getLogger(__name__)

Notify = Callable[[Outgoing], None]
STATS_PERIOD_S = 1.0
FAILED_LINGER_S = 5.0  # keep a failed session visible in GET /sessions/{id} this long
VIDEO_CODECS = ("video/H264", "video/VP8", "video/rtx")


class RtcSink:
    """Session sink: frames to both tracks, events to the peer's notifier."""

    def __init__(self, peer: RtcPeer) -> None:
        self._peer = weakref.ref(peer)  # the peer owns its sink (no cycle)

    def on_frame(self, frame: OutputFrame) -> None:
        if (peer := self._peer()) is not None:
            peer.video.push(frame)
            peer.audio.push(frame)

    def on_event(self, event: SessionEvent | ServiceError) -> None:
        if (peer := self._peer()) is None:
            return
        if isinstance(event, ServiceError) and not peer.viewer:
            peer.session.stats.error_sent()
        session = peer.session
        msg = event_message(session.session_id, event, session.avatar.names)
        peer.notify(msg)


def _sends_h264(sdp: str) -> bool:
    """Whether an SDP's video m-line puts H.264 first (the codec the sender will use)."""
    video = sdp.split("m=video", 1)[1].split("\nm=", 1)[0] if "m=video" in sdp else ""
    fields = video.split("\n", 1)[0].split()  # <port> <proto> <payload types...>
    if len(fields) < 3:
        return False
    pt = fields[2]
    return any(line.startswith(f"a=rtpmap:{pt} H264/") for line in video.splitlines())


def _video_preferences() -> list[Any]:
    caps = RTCRtpSender.getCapabilities("video").codecs
    return [c for mime in VIDEO_CODECS for c in caps if c.mimeType == mime]


def _stats_summary(report: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in report.values():
        kind = getattr(s, "kind", None)
        if s.type == "remote-inbound-rtp":  # what the client reports about our streams
            out[f"{kind}_out"] = {"rtt_ms": round(s.roundTripTime * 1000, 1),
                                  "jitter": s.jitter, "packets_lost": s.packetsLost,
                                  "fraction_lost": s.fractionLost}
        elif s.type == "outbound-rtp":
            out.setdefault(f"{kind}_sent", {}).update(packets=s.packetsSent, bytes=s.bytesSent)
        elif s.type == "inbound-rtp":  # the client's microphone
            out[f"{kind}_in"] = {"packets": s.packetsReceived, "packets_lost": s.packetsLost,
                                 "jitter": s.jitter}
    return out


class RtcPeer:
    """One client: a peer connection, its session, tracks and helper tasks."""

    def __init__(self, hub: RtcHub, session: Session, notify: Notify | None,
                 viewer_key: str | None = None) -> None:
        self.hub = hub
        self.session = session
        self._notify = notify
        #: a viewer has a hub key of its own; the session's owner is keyed by the session id
        self.viewer = viewer_key is not None
        self.key = viewer_key or session.session_id
        self.pc = RTCPeerConnection(rtc_configuration(hub.settings.ice_servers))
        self.video = SessionVideoTrack(session, account=not self.viewer)
        self.audio = SessionAudioTrack()
        self.sink = RtcSink(self)
        self.mic: MicIngest | None = None
        self.feed: SessionFeed | None = None
        self.packets: Outbox | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self.closing = False
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("track", self._on_track)

    @property
    def session_id(self) -> str:
        return self.session.session_id

    def notify(self, msg: Outgoing) -> None:
        if self._notify is not None:
            self._notify(msg)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.session_id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- negotiation
    async def answer(self, sdp: str, type_: str) -> RTCSessionDescription:
        """Apply the offer and return an answer that carries every candidate."""
        if type_ != "offer":
            raise InvalidMessage(f"expected an SDP offer, got type {type_!r}")
        try:
            if "m=video" not in sdp:
                raise InvalidMessage("the offer has no video m-line; add a recvonly video "
                                     "transceiver")
            # codec preferences count only on a transceiver that exists before the offer is
            # applied (aiortc negotiates there): H.264 first, VP8 for clients without it
            self.pc.addTransceiver("video", direction="sendrecv").setCodecPreferences(
                _video_preferences())
            with host_addresses(self.hub.settings.rtc_host_addresses):
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=type_))
                kinds = {t.kind: t for t in self.pc.getTransceivers() if t.mid is not None}
                if "video" not in kinds:
                    raise InvalidMessage("the offer has no usable video m-line")
                self.pc.addTrack(self.video)
                if "audio" in kinds:
                    self.pc.addTrack(self.audio)
                if self.viewer:  # receive-only: answer sendonly, whatever the client offered
                    for t in kinds.values():
                        t.direction = "sendonly"
                await self.pc.setLocalDescription(await self.pc.createAnswer())
        except ServiceError:
            raise
        except (ValueError, KeyError, AttributeError) as exc:  # aiortc's SDP parse errors
            raise InvalidMessage(f"cannot use this SDP offer: {exc}") from None
        self.session.add_sink(self.sink)
        if _sends_h264(self.pc.localDescription.sdp):
            await self._share_packets()
        if self.viewer:
            self.hub.count_viewers(self.session)
        else:
            self.session.stats.rtc_state(self.pc.connectionState)
            self._spawn(self._poll_stats(), "rtc-stats")
        return self.pc.localDescription

    async def _share_packets(self) -> None:
        """Send the session's own H.264 packets (encoded once for every reader)."""
        self.feed = await ensure_feed(self.hub.services, self.session)
        self.packets = Outbox(self.session, self.hub.settings.send_queue_frames)
        self.feed.subscribe(self.packets)
        self.video.use_packets(self.packets)

    # ---------------------------------------------------------------- events
    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.mic is None and not self.viewer:
            self.mic = MicIngest(track, self.session)
            self._spawn(self.mic.run(), "rtc-mic")

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if not self.viewer:
            self.session.stats.rtc_state(state)
        log.info("session %s: %s connection %s", self.session_id,
                 "viewer" if self.viewer else "peer", state)
        if state == "connected":
            self.notify(SigConnected(session_id=self.session_id))
        elif state == "failed":
            err = ProcessingError("the WebRTC connection failed (ICE found no working path); "
                                  "check the ICE servers / TURN relay and firewalls",
                                  {"reason": "ice_failed", "session_id": self.session_id})
            if not self.viewer:
                self.session.stats.rtc_failed(err.code, err.message)
            self.notify(signaling_error(err))
            # REST (/offer) clients only learn of it by polling the session: keep it a while
            linger = FAILED_LINGER_S if self._notify is None and not self.viewer else 0.0
            self._spawn(self.close("ice failed", linger=linger), "rtc-close")
        elif state == "closed":
            self._spawn(self.close("peer closed"), "rtc-close")

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD_S)
            with contextlib.suppress(Exception):  # stats are best effort
                summary = _stats_summary(await self.pc.getStats())
                mic_s = None if self.mic is None else round(self.mic.pushed_samples / SAMPLE_RATE, 3)
                self.session.stats.rtc_report(summary, mic_s)

    # ---------------------------------------------------------------- teardown
    async def close(self, reason: str, linger: float = 0.0) -> None:
        """Close the connection and free the session; idempotent, waits for the first close."""
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        try:
            if linger:
                await asyncio.sleep(linger)
            self.session.remove_sink(self.sink)
            current = asyncio.current_task()
            for t in [t for t in self._tasks if t is not current]:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self.video.stop()
            self.audio.stop()
            await self.pc.close()
            self.pc.remove_all_listeners()  # they are bound methods of this peer
            if self.feed is not None and self.packets is not None:
                self.feed.unsubscribe(self.packets)
                await release_feed(self.hub.services, self.feed)
            if self.viewer:
                self.hub.services.sessions.detach(self.session_id, self)
            else:
                await self.hub.services.sessions.close(self.session_id)
            self.notify(SigDisconnected(session_id=self.session_id, reason=reason))
        finally:
            self.hub.release(self.key)
            if self.viewer:
                self.hub.services.sessions.release_viewer(self.key)
                self.hub.count_viewers(self.session)
            self._closed.set()

    async def aclose(self) -> None:
        """The session closed (a viewer is attached to it): disconnect."""
        await self.close("the session closed")


class RtcHub:
    """All WebRTC clients of the app: the ``max_rtc_clients`` limit and shutdown."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings: Settings = services.settings
        self.peers: dict[str, RtcPeer] = {}
        self._slots: set[str] = set()

    def reserve(self, key: str) -> None:
        if len(self._slots) >= self.settings.max_rtc_clients:
            raise RateLimitExceeded(
                f"the server is at its limit of {self.settings.max_rtc_clients} WebRTC clients; "
                "try again later", {"max_rtc_clients": self.settings.max_rtc_clients}, fatal=True)
        self._slots.add(key)

    def release(self, key: str) -> None:
        self._slots.discard(key)
        self.peers.pop(key, None)

    def count_viewers(self, session: Session) -> None:
        """Show how many viewers ``session`` has in its statistics (``rtc.viewers``)."""
        session.stats.rtc_viewers(sum(
            p.viewer and p.session is session and not p.closing for p in self.peers.values()))

    async def connect(self, user_id: str, sdp: str, type_: str, config: VideoConfig,
                      notify: Notify | None = None, slot: str | None = None) -> RtcPeer:
        """Create a session and a peer for an offer. ``slot`` is an already reserved key."""
        session_id = str(uuid.uuid4())
        if slot is None:
            self.reserve(session_id)
        session = None
        try:
            session = await self.services.sessions.create(session_id, user_id, config,
                                                          transport="webrtc")
            peer = RtcPeer(self, session, notify)
            self.peers[session_id] = peer
            session.start()
            await peer.answer(sdp, type_)
            return peer
        except BaseException:
            failed = self.peers.pop(session_id, None)
            if failed is not None:
                with contextlib.suppress(Exception):
                    await failed.pc.close()
            if session is not None:
                await self.services.sessions.close(session_id)
            if slot is None:
                self.release(session_id)
            raise

    async def view(self, session_id: str, sdp: str, type_: str, client_ip: str | None,
                   notify: Notify | None = None, slot: str | None = None) -> RtcPeer:
        """Attach a receive-only viewer peer to the running session ``session_id`` (the
        caller has checked that it may watch; this checks the viewer limits)."""
        mgr = self.services.sessions
        session = mgr.get(session_id)
        key = mgr.admit_viewer(session_id, client_ip)
        if slot is None:
            try:
                self.reserve(key)
            except RateLimitExceeded:
                mgr.release_viewer(key)
                raise
        peer = RtcPeer(self, session, notify, viewer_key=key)
        self.peers[key] = peer
        try:
            self.services.sessions.attach(session_id, peer)
            await peer.answer(sdp, type_)
            return peer
        except BaseException:
            self.services.sessions.detach(session_id, peer)
            session.remove_sink(peer.sink)
            with contextlib.suppress(Exception):
                await peer.pc.close()
            self.release(peer.key)
            mgr.release_viewer(key)
            raise

    async def close_all(self) -> None:
        for peer in list(self.peers.values()):
            await peer.close("server shutting down")
