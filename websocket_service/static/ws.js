// The WebSocket protocol client: INIT, VIDEO_FRAME/ACTION_FRAME decoded with WebCodecs
// (H.264 Annex B, no description) onto a canvas, speech sent as 40 ms PCM chunks and played
// back in sync with the frames that lip-sync it. Every message is an envelope
// {type, session_id, data}; what reaches the page is flattened to {type, session_id, ...data}.

import { FRAME_SAMPLES, RATE, UtterancePlayer } from "./audio.js";
import { withToken } from "./auth.js";

const CODEC = "avc1.42E01F"; // constrained baseline, level 3.1

function uuid4() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function b64ToBytes(s) {
  const bin = atob(s), out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function pcmToB64(pcm) {
  const bytes = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

/** A protocol message. */
function envelope(type, sessionId, data = {}) {
  return { type, session_id: sessionId, data };
}

/** A server envelope as {type, session_id, ...data}. */
export function unwrap(env) {
  return { type: env.type, session_id: env.session_id, ...(env.data || {}) };
}

export class WsClient {
  constructor({ canvas, userId, avatarId, log, onEvent, onClose }) {
    Object.assign(this, { canvas, userId, avatarId, log, onEvent, onClose });
    this.g = canvas.getContext("2d");
    this.audio = new AudioContext({ sampleRate: RATE });
    this.player = new UtterancePlayer(this.audio);
    this.meta = new Map();  // timestamp (µs) -> frame fields, until the frame is drawn
    this.framesDecoded = 0; this.bytes = 0; this.dropped = 0; this.lastIndex = null;
    this.needKey = true; this.sendTimes = null; this.g2g = []; this.closing = false;
  }

  connect() {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/musetalk/v1/ws/${this.userId}`;
    this.sessionId = uuid4();
    this.ws = new WebSocket(url);
    this._newDecoder();
    return new Promise((resolve, reject) => {
      this.ws.onopen = () => this.ws.send(JSON.stringify(envelope("INIT", this.sessionId,
        withToken({ user_id: this.userId, video_config: this._videoConfig() }))));
      this.ws.onmessage = (e) => {
        const msg = unwrap(JSON.parse(e.data));
        if (msg.type === "INIT_SUCCESS") resolve(msg);
        if (msg.type === "ERROR" && !this.info) reject(new Error(`${msg.code}: ${msg.message}`));
        this._onMessage(msg, e.data.length);
      };
      this.ws.onclose = (e) => { reject(new Error(`closed (${e.code})`)); this._closed(e); };
    });
  }

  _videoConfig() {
    const vc = { resolution: "512x512", fps: 25 };
    if (this.avatarId) vc.avatar_id = this.avatarId;
    return vc;
  }

  _newDecoder() {
    this.decoder = new VideoDecoder({
      output: (frame) => this._draw(frame),
      error: (err) => { this.log(`decoder error: ${err.message}`, "error"); this.needKey = true; },
    });
    this.decoder.configure({ codec: CODEC, optimizeForLatency: true });
  }

  _onMessage(msg, size) {
    if (msg.type === "VIDEO_FRAME" || msg.type === "ACTION_FRAME") return this._frame(msg, size);
    if (msg.type === "INIT_SUCCESS") {
      this.info = msg;
      this.canvas.width = msg.video_config.width; this.canvas.height = msg.video_config.height;
      // action buttons show the clips' own names; ACTION goes out in the v1.1 form (by index)
      const acts = msg.videos.filter((v) => v.kind === "action");
      msg.actions = acts.map((v) => v.clip);
      this.actionIndex = new Map(acts.map((v) => [v.clip, Number(v.name.split("_").pop())]));
    }
    if (msg.type === "SPEECH_ENDED" && msg.interrupted) this.player.stop();
    this.onEvent(msg);
  }

  _frame(msg, size) {
    this.bytes += size;
    if (this.lastIndex !== null && msg.frame_index > this.lastIndex + 1) {
      this.dropped += msg.frame_index - this.lastIndex - 1;
    }
    this.lastIndex = msg.frame_index;
    if (this.needKey && !msg.keyframe) return;
    if (this.decoder.state === "closed") this._newDecoder();
    this.needKey = false;
    const timestamp = msg.frame_index * 40000;
    this.meta.set(timestamp, { state: msg.type === "ACTION_FRAME" ? "action" : msg.state,
      uid: msg.utterance_id, n: msg.utterance_frame });
    this.decoder.decode(new EncodedVideoChunk({ type: msg.keyframe ? "key" : "delta",
      timestamp, data: b64ToBytes(msg.frame_data) }));
  }

  _draw(frame) {
    const m = this.meta.get(frame.timestamp) || {};
    this.meta.delete(frame.timestamp);
    for (const k of this.meta.keys()) if (k < frame.timestamp) this.meta.delete(k);
    this.g.drawImage(frame, 0, 0, this.canvas.width, this.canvas.height);
    frame.close();
    const now = performance.now();
    this.framesDecoded++;
    if (this.firstFrameAt === undefined) this.firstFrameAt = now;
    if (this.player.onFrame(m.uid, m.n) && this.sendTimes && this.sendTimes[m.n] !== undefined) {
      this.g2g.push(now - this.sendTimes[m.n]);
    }
    this.onEvent({ type: "frame", state: m.state });
  }

  _send(obj) { if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj)); }

  /** Stream `pcm` in real time, 40 ms per message, then END_OF_SPEECH. */
  async speak(pcm) {
    await this.audio.resume();
    this.player.expect(pcm);
    const times = (this.sendTimes = []);
    const t0 = performance.now();
    for (let k = 0; k * FRAME_SAMPLES < pcm.length; k++) {
      const wait = t0 + k * 40 - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      if (this.ws?.readyState !== WebSocket.OPEN || this.sendTimes !== times) return;
      const chunk = pcm.subarray(k * FRAME_SAMPLES, (k + 1) * FRAME_SAMPLES);
      times[k] = performance.now();
      this._send(envelope("GENERATE", this.sessionId, { audio_chunk: { data: pcmToB64(chunk),
        format: "pcm_s16le", sample_rate: RATE, channels: 1, duration_ms: chunk.length / 16 } }));
    }
    this._send(envelope("END_OF_SPEECH", this.sessionId));
  }

  /** Microphone in: 16 kHz capture (the context resamples), sent while loud. */
  async micOn() {
    await this.audio.resume();
    this.micStream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const src = this.audio.createMediaStreamSource(this.micStream);
    const proc = this.audio.createScriptProcessor(512, 1, 1);
    let quiet = Infinity;
    proc.onaudioprocess = (e) => {
      const f = e.inputBuffer.getChannelData(0);
      let sum = 0;
      for (const v of f) sum += v * v;
      quiet = Math.sqrt(sum / f.length) > 0.0056 ? 0 : quiet + f.length; // -45 dBFS gate
      if (quiet > 0.3 * RATE) return;
      const pcm = new Int16Array(f.length);
      for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-1, Math.min(1, f[i])) * 32767;
      if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(pcm.buffer);
    };
    src.connect(proc); proc.connect(this.audio.destination);
    this.micNodes = [src, proc];
  }

  micOff() {
    this.micNodes?.forEach((n) => n.disconnect());
    this.micStream?.getTracks().forEach((t) => t.stop());
    this.micNodes = this.micStream = null;
  }

  action(name) {
    this._send(envelope("ACTION", this.sessionId, { action_index: this.actionIndex.get(name) }));
  }

  interrupt() {
    this.sendTimes = null; this.player.reset();
    this._send(envelope("INTERRUPT", this.sessionId));
  }

  ping() { this._send(envelope("PING", this.sessionId, { t: performance.now() })); }

  close() {
    this.closing = true;
    this._send(envelope("CLOSE", this.sessionId));
    this.ws?.close(1000);
    this._teardown();
  }

  _closed(e) { this._teardown(); if (!this.closing) this.onClose(`WebSocket closed (${e.code})`); }

  _teardown() {
    this.micOff(); this.player.reset();
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.audio.close().catch(() => {});
  }

  stats() {
    return { framesDecoded: this.framesDecoded, bytes: this.bytes, dropped: this.dropped };
  }
}
