// Speech samples and their playback: WAV parsing, 16 kHz PCM helpers, and the
// utterance player that keeps sent speech in sync with the WebSocket video.

export const RATE = 16000;
export const FRAME_SAMPLES = 640; // 40 ms: the audio that plays with one video frame

/** Fetch a 16 kHz mono s16le WAV and return its samples. */
export async function loadWav(url) {
  const buf = await (await fetch(url)).arrayBuffer();
  const view = new DataView(buf);
  let pos = 12;
  while (pos + 8 <= view.byteLength) {
    const id = String.fromCharCode(...new Uint8Array(buf, pos, 4));
    const size = view.getUint32(pos + 4, true);
    if (id === "data") return new Int16Array(buf.slice(pos + 8, pos + 8 + size));
    pos += 8 + size + (size & 1);
  }
  throw new Error("no data chunk in " + url);
}

/** Index of the first 20 ms block louder than `dbfs` (where speech starts). */
export function firstLoudSample(pcm, dbfs = -45) {
  const block = 320, limit = 32768 * Math.pow(10, dbfs / 20);
  for (let i = 0; i + block <= pcm.length; i += block) {
    let sum = 0;
    for (let j = i; j < i + block; j++) sum += pcm[j] * pcm[j];
    if (Math.sqrt(sum / block) > limit) return i;
  }
  return 0;
}

export function toAudioBuffer(ctx, pcm) {
  const ab = ctx.createBuffer(1, pcm.length, RATE);
  const ch = ab.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  return ab;
}

/**
 * Plays what the page sent over the WebSocket, aligned to the frames drawn: when the frame
 * with utterance_frame = n is drawn, sample 640 n of that utterance is playing.
 */
export class UtterancePlayer {
  constructor(ctx) {
    this.ctx = ctx;
    this.pending = [];      // PCM of utterances sent, not yet seen in the video
    this.current = null;    // {uid, buffer, source, t0, offset0}
  }

  expect(pcm) { this.pending.push(toAudioBuffer(this.ctx, pcm)); }

  /** Call when a frame is drawn. Returns true when this frame belongs to sent speech. */
  onFrame(uid, n) {
    if (uid == null || n == null) return false;
    if (!this.current || this.current.uid !== uid) {
      this.stop();
      const buffer = this.pending.shift();
      if (!buffer) return false;
      this.current = { uid, buffer, source: null };
    }
    const cur = this.current;
    const want = n * FRAME_SAMPLES / RATE;
    const playing = cur.source ? this.ctx.currentTime - cur.t0 + cur.offset0 : null;
    if (playing === null || Math.abs(playing - want) > 0.12) this._start(want);
    return true;
  }

  _start(offset) {
    const cur = this.current;
    if (cur.source) cur.source.stop();
    if (offset >= cur.buffer.duration) return;
    const src = this.ctx.createBufferSource();
    src.buffer = cur.buffer;
    src.connect(this.ctx.destination);
    src.start(0, offset);
    Object.assign(cur, { source: src, t0: this.ctx.currentTime, offset0: offset });
  }

  stop() {
    if (this.current?.source) this.current.source.stop();
    this.current = null;
  }

  reset() { this.stop(); this.pending = []; }
}
