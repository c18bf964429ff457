// The WebRTC client: signaling over /musetalk/v1/rtc/{user_id}, video + audio received,
// one audio sender whose track is swapped between nothing, a speech sample and the mic.

import { firstLoudSample, RATE, toAudioBuffer } from "./audio.js";
import { authFetch, withToken } from "./auth.js";

/** Signaling messages are flat; the session's own events are protocol envelopes. */
function flatten(m) {
  return m.data && typeof m.data === "object" ? { type: m.type, session_id: m.session_id, ...m.data } : m;
}

export class RtcClient {
  constructor({ video, userId, avatarId, log, onEvent, onClose }) {
    Object.assign(this, { video, userId, avatarId, log, onEvent, onClose });
    this.closing = false; this.g2g = []; this.framesDecoded = 0;
  }

  async connect() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    this.ws = new WebSocket(`${proto}://${location.host}/musetalk/v1/rtc/${this.userId}`);
    this.ws.onmessage = (e) => this._onSignal(flatten(JSON.parse(e.data)));
    this.ws.onclose = (e) => this._lost(`signaling closed (${e.code})`);
    await new Promise((ok, fail) => {
      this.ws.onopen = ok;
      this.ws.onerror = () => fail(new Error("cannot open the signaling socket"));
    });
    this.ping = setInterval(() => this._send({ type: "ping", t: performance.now() }), 10000);

    const pc = (this.pc = new RTCPeerConnection({ iceServers: [] }));
    pc.addTransceiver("video", { direction: "recvonly" });
    this.audioTx = pc.addTransceiver("audio", { direction: "sendrecv" });
    const stream = new MediaStream();
    pc.ontrack = (e) => { stream.addTrack(e.track); this.video.srcObject = stream; };
    pc.onconnectionstatechange = () => {
      this.log(`peer connection: ${pc.connectionState}`);
      if (pc.connectionState === "failed") this._lost("WebRTC connection failed");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await this._gathered(pc, 2000);
    this.answered = new Promise((ok, fail) => { this._answer = ok; this._fail = fail; });
    const offer = { type: "offer", sdp: pc.localDescription.sdp };
    if (this.avatarId) offer.avatar_id = this.avatarId;
    this._send(withToken(offer));
    await this.answered;
    this._watchFrames();
  }

  _gathered(pc, ms) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((ok) => {
      const t = setTimeout(ok, ms);
      pc.onicegatheringstatechange = () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(t); ok(); }
      };
    });
  }

  async _onSignal(msg) {
    if (msg.type === "answer") {
      this.sessionId = msg.session_id;
      await this.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
      this._answer(msg);
    } else if (msg.type === "error") {
      this.log(`server error ${msg.code}: ${msg.message}`, "error");
      if (!this.sessionId) this._fail?.(new Error(`${msg.code}: ${msg.message}`));
    } else if (msg.type === "disconnected") {
      this._lost(`server disconnected: ${msg.reason}`);
    }
    this.onEvent(msg);
  }

  /** Count presented frames; time the first speaking frame after speech was sent. */
  _watchFrames() {
    const v = this.video;
    if (!v.requestVideoFrameCallback) return;
    const tick = (now, meta) => {
      if (this.firstFrameAt === undefined) this.firstFrameAt = performance.now();
      if (this.speakingEventAt !== undefined && meta.receiveTime > this.speakingEventAt) {
        this.g2g.push(performance.now() - this.speechSentAt);
        this.speakingEventAt = undefined;
      }
      if (!this.closing) v.requestVideoFrameCallback(tick);
    };
    v.requestVideoFrameCallback(tick);
  }

  /** Note when the server says speech started (the measurement's second half). */
  sawSpeaking() {
    if (this.speechSentAt !== undefined && this.speakingEventAt === undefined && !this.g2gDone) {
      this.speakingEventAt = performance.now();
      this.g2gDone = true;
    }
  }

  _send(obj) { if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj)); }

  _audioCtx() { return (this.ctx ||= new AudioContext()); }

  /** Play `pcm` into the audio sender: the server hears it like a microphone. */
  async speak(pcm) {
    const ctx = this._audioCtx();
    await ctx.resume();
    const dest = ctx.createMediaStreamDestination();
    await this.audioTx.sender.replaceTrack(dest.stream.getAudioTracks()[0]);
    const src = ctx.createBufferSource();
    src.buffer = toAudioBuffer(ctx, pcm);
    src.connect(dest);
    const startAt = ctx.currentTime + 0.05;
    src.start(startAt);
    const lead = firstLoudSample(pcm) / RATE;
    this.speechSentAt = performance.now() + (startAt - ctx.currentTime + lead) * 1000;
    this.g2gDone = false;
    src.onended = () => { if (!this.micStream) this.audioTx.sender.replaceTrack(null); };
  }

  async micOn() {
    this.micStream = await navigator.mediaDevices.getUserMedia({ audio: true });
    await this.audioTx.sender.replaceTrack(this.micStream.getAudioTracks()[0]);
  }

  micOff() {
    this.micStream?.getTracks().forEach((t) => t.stop());
    this.micStream = null;
    this.audioTx?.sender.replaceTrack(null);
  }

  async _rest(path) {
    const r = await authFetch(`/sessions/${this.sessionId}/${path}`, { method: "POST" });
    if (!r.ok) { const e = await r.json(); this.log(`${e.code}: ${e.message}`, "error"); }
  }

  action(name) { return this._rest(`action/${name}`); }
  interrupt() { return this._rest("interrupt"); }

  /** Inbound video/audio numbers from getStats(), for the metrics panel and tests. */
  async stats() {
    const out = { framesDecoded: 0, bytes: 0, packetsLost: 0, packetsReceived: 0, dropped: 0 };
    if (!this.pc) return out;
    for (const s of (await this.pc.getStats()).values()) {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        Object.assign(out, { framesDecoded: s.framesDecoded || 0, dropped: s.framesDropped || 0,
          fps: s.framesPerSecond, jitterBufferMs: s.jitterBufferEmittedCount
            ? 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount : undefined });
      }
      if (s.type === "inbound-rtp") {
        out.bytes += s.bytesReceived || 0;
        out.packetsLost += s.packetsLost || 0;
        out.packetsReceived += s.packetsReceived || 0;
      }
      if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
        out.rttMs = s.currentRoundTripTime * 1000;
      }
    }
    this.framesDecoded = out.framesDecoded;
    return out;
  }

  _lost(reason) {
    if (this.closing) return;
    this.close();
    this.onClose(reason);
  }

  close() {
    this.closing = true;
    clearInterval(this.ping);
    this._send({ type: "bye" });
    this.micOff();
    this.pc?.close();
    this.ws?.close(1000);
    this.ctx?.close().catch(() => {});
    this.video.srcObject = null;
  }
}
