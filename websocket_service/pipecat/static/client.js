// The bot's own browser client: SmallWebRTC signaling (one POST /api/offer), the microphone
// up, the avatar's video and audio down, and pipecat's RTVI messages over a data channel.
// Plain browser APIs only: nothing is fetched from anywhere but this server.

const $ = (id) => document.getElementById(id);
const RTVI = "rtvi-ai";
const MAX_EVENTS = 500;
// the bot's AUTH_TOKEN, when it has one: open the page with ?token=...
const TOKEN = new URLSearchParams(location.search).get("token");
const AUTH = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};

/** What the bot is doing, from the RTVI events that say so. */
const STATES = {
  "bot-ready": "listening",
  "user-started-speaking": "user speaking",
  "vad-user-started-speaking": "user speaking",
  "user-stopped-speaking": "thinking",
  "vad-user-stopped-speaking": "thinking",
  "bot-started-speaking": "speaking",
  "bot-stopped-speaking": "listening",
  "bot-interrupted": "interrupted",
};

export class AvatarClient {
  constructor(video) {
    this.video = video;
    this.pc = null;
    this.mic = null;
    this.events = []; // {type, t (performance.now()), data}: what arrived over the data channel
    this.state = "disconnected";
    this.onchange = () => {};
  }

  async connect() {
    this.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const ice = await fetch(new URL("../api/ice-servers", location.href), { headers: AUTH });
    if (ice.status === 401) throw new Error("this bot needs its token: open the page with ?token=...");
    const { iceServers } = ice.ok ? await ice.json() : { iceServers: [] };
    const pc = (this.pc = new RTCPeerConnection({ iceServers }));
    // pipecat's SmallWebRTC takes the first transceiver as the mic, the second as video
    pc.addTransceiver(this.mic.getAudioTracks()[0], { direction: "sendrecv" });
    pc.addTransceiver("video", { direction: "recvonly" });
    const stream = new MediaStream();
    pc.ontrack = (e) => { stream.addTrack(e.track); this.video.srcObject = stream; };
    pc.onconnectionstatechange = () => {
      this._set(pc.connectionState);
      if (pc.connectionState === "failed") this.disconnect();
    };
    this.channel = pc.createDataChannel("messages", { ordered: true });
    this.channel.onopen = () => this._ready();
    this.channel.onmessage = (e) => this._message(e.data);
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 3000);
    const r = await fetch(new URL("../api/offer", location.href), {  // the page is at /client/
      method: "POST",
      headers: { "Content-Type": "application/json", ...AUTH },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
    });
    if (!r.ok) throw new Error(`offer refused: ${r.status} ${await r.text()}`);
    const answer = await r.json();
    this.pcId = answer.pc_id;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  }

  disconnect() {
    clearInterval(this.pinger);
    if (this.channel?.readyState === "open") this._send({ type: "disconnect-bot" });
    this.pc?.close();
    this.mic?.getTracks().forEach((t) => t.stop());
    this.pc = this.mic = this.channel = null;
    this.video.srcObject = null;
    this._set("disconnected");
  }

  /** Mute or unmute the microphone (the track sends silence while disabled). */
  setMic(on) {
    this.mic?.getAudioTracks().forEach((t) => { t.enabled = on; });
    this.onchange();
  }

  get micOn() { return !!this.mic?.getAudioTracks().some((t) => t.enabled); }

  _ready() {
    // pipecat's server treats a data channel that pings as a live client (3 s window)
    this.pinger = setInterval(() => this.channel?.readyState === "open" && this.channel.send(`ping: ${Date.now()}`), 1000);
    this._send({ type: "client-ready", data: { version: "2.2.0", about: { library: "avatar-bot-client" } } });
  }

  _send(msg) {
    this.channel.send(JSON.stringify({ id: Math.random().toString(36).slice(2), label: RTVI, ...msg }));
  }

  _message(raw) {
    let msg;
    try { msg = JSON.parse(raw); } catch { return; }
    if (msg.label !== RTVI) return;
    this.events.push({ type: msg.type, t: performance.now(), data: msg.data });
    if (this.events.length > MAX_EVENTS) this.events.shift();
    if (STATES[msg.type]) this.state = STATES[msg.type];
    this.onchange(msg);
  }

  _set(conn) {
    this.connection = conn;
    if (conn === "disconnected" || conn === "closed") this.state = "disconnected";
    this.onchange();
  }
}

function gathered(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((ok) => {
    const t = setTimeout(ok, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(t); ok(); }
    });
  });
}

/** Text that a transcript shows: the user's final transcription, the bot's words. */
function transcriptLine(msg) {
  const text = msg.data?.text;
  if (!text) return null;
  if (msg.type === "user-transcription" && msg.data.final) return `you: ${text}`;
  if (msg.type === "bot-output" || msg.type === "bot-transcription") return `bot: ${text}`;
  return null;
}

const client = new AvatarClient($("bot-video"));
window.avatarClient = client;

client.onchange = (msg) => {
  const live = !!client.pc;
  $("conn").textContent = client.connection || "idle";
  $("state").textContent = client.state;
  $("connect").disabled = live;
  $("disconnect").disabled = !live;
  $("mic").disabled = !live;
  $("mic").textContent = client.micOn ? "Mic off" : "Mic on";
  if (!msg) return;
  const events = $("events");
  events.textContent += `${msg.type}\n`;
  events.scrollTop = events.scrollHeight;
  const line = transcriptLine(msg);
  if (line) $("transcript").textContent += `${line}\n`;
};

$("connect").onclick = async () => {
  $("connect").disabled = true;
  try {
    await client.connect();
  } catch (e) {
    $("events").textContent += `error: ${e.message}\n`;
    client.disconnect();
  }
};
$("disconnect").onclick = () => client.disconnect();
$("mic").onclick = () => client.setMic(!client.micOn);
