// Demo page glue: buttons, metrics, log, automatic reconnect. Counters live on
// window.__stats for tests and benchmarks.

import { loadWav } from "./audio.js";
import { authFetch } from "./auth.js";
import { AvatarPanel } from "./avatars.js";
import { RtcClient } from "./rtc.js";
import { WsClient } from "./ws.js";

const $ = (id) => document.getElementById(id);
const stats = (window.__stats = {
  transport: null, connected: false, state: "offline", webrtcFramesDecoded: 0, wsFramesDecoded: 0,
  ttffMs: null, g2gMs: [], speakingSeen: 0, actionSeen: 0, reconnects: 0, errors: [],
});
const userId = "demo-" + Math.random().toString(36).slice(2, 8);
let client = null, connectClickedAt = 0, wanted = false, backoff = 500, retryTimer = null;
let sample = null, lastBytes = 0, lastAt = 0;
const avatars = new AvatarPanel({ userId, log });

function log(text, cls = "") {
  const li = document.createElement("li");
  li.className = cls;
  li.innerHTML = `<time>${new Date().toLocaleTimeString()}</time>`;
  li.append(text);
  const box = $("log");
  box.append(li);
  while (box.children.length > 200) box.firstChild.remove();
  box.scrollTop = box.scrollHeight;
  if (cls === "error") stats.errors.push(text);
}

function transport() { return document.querySelector("input[name=transport]:checked").value; }

function setState(state) {
  stats.state = state;
  if (state === "speaking") stats.speakingSeen++;
  if (state === "action") stats.actionSeen++;
  const b = $("badge");
  b.dataset.state = state; b.textContent = state;
}

function setConnected(on) {
  stats.connected = on;
  $("connect").disabled = on || wanted;
  $("disconnect").disabled = !wanted;
  for (const id of ["speak", "mic", "interrupt"]) $(id).disabled = !on;
  document.querySelectorAll("input[name=transport]").forEach((r) => (r.disabled = wanted));
  $("avatar").disabled = wanted;
  $("placeholder").hidden = on;
}

function showActions(names) {
  const row = $("actions");
  row.replaceChildren(...names.map((name) => {
    const b = document.createElement("button");
    b.textContent = name;
    b.dataset.action = name;
    b.onclick = () => { client?.action(name); log(`action ${name}`); };
    return b;
  }));
}

function onEvent(msg) {
  if (msg.type === "frame") {
    if (stats.ttffMs === null) {
      stats.ttffMs = Math.round(performance.now() - connectClickedAt);
      log(`first frame after ${stats.ttffMs} ms`);
    }
    if (msg.state && msg.state !== stats.state) setState(msg.state);
    return;
  }
  if (msg.type === "STATE_CHANGED") {
    if (transport() === "webrtc") {
      setState(msg.current_state);
      if (msg.current_state === "speaking") client.sawSpeaking();
    }
    log(`state ${msg.previous_state} → ${msg.current_state}`, "event");
  } else if (msg.type === "SPEECH_ENDED") {
    log(`speech ended: utterance ${msg.utterance_id}, ${msg.frames} frames${msg.interrupted ? " (interrupted)" : ""}`, "event");
  } else if (msg.type === "ERROR" || msg.type === "error") {
    log(`error ${msg.code}: ${msg.message}`, "error");
  } else if (msg.type === "connected") {
    log("media connected", "event");
  } else if (msg.type === "disconnected") {
    log(`disconnected: ${msg.reason}`, "event");
  }
}

async function actionsFor(sessionId) {
  const s = await (await authFetch(`/sessions/${sessionId}`)).json();
  if (stats.state === "connecting") setState(s.state);
  const a = await (await authFetch(`/avatars/${s.avatar}`)).json();
  return Object.entries(a.clips || {}).filter(([, c]) => c.kind === "action").map(([n]) => n);
}

async function connect() {
  clearTimeout(retryTimer);
  const kind = transport();
  stats.transport = kind; stats.ttffMs = null;
  connectClickedAt = performance.now();
  setState("connecting");
  $("video").hidden = kind !== "webrtc"; $("canvas").hidden = kind !== "ws";
  $("transportTag").textContent = kind === "webrtc" ? "WebRTC" : "WebSocket · WebCodecs";
  const opts = { userId, log, onEvent, onClose: lost };
  try {
    let where = "";
    if (kind === "webrtc") {
      client = new RtcClient({ ...opts, video: $("video"), avatarId: avatars.selected });
      await client.connect();
      showActions(await actionsFor(client.sessionId));
    } else {
      client = new WsClient({ ...opts, canvas: $("canvas"), avatarId: avatars.selected });
      const init = await client.connect();
      showActions(init.actions);
      // scaled out: a lost replica's session comes back on another one
      if (init.replica_id) where = ` on replica ${init.replica_id}`;
    }
    stats.sessionId = client.sessionId;
    log(`${stats.reconnects ? "reconnected" : "connected"} over ${kind}: session ` +
        `${client.sessionId}${where}`);
    avatars.refresh();
    backoff = 500;
    setConnected(true);
  } catch (err) {
    log(`connect failed: ${err.message}`, "error");
    lost(err.message);
  }
}

function lost(reason) {
  setConnected(false); setState("offline");
  client?.close(); client = null;
  if (!wanted) return;
  log(`connection lost (${reason}); retrying in ${backoff / 1000} s`, "error");
  stats.reconnects++;
  retryTimer = setTimeout(connect, backoff);
  backoff = Math.min(backoff * 2, 15000);
}

$("connect").onclick = () => { wanted = true; setConnected(false); connect(); };
$("disconnect").onclick = () => {
  wanted = false; clearTimeout(retryTimer);
  client?.close(); client = null;
  setConnected(false); setState("offline"); log("disconnected");
};
$("speak").onclick = async () => {
  sample ||= await loadWav("/samples/speech.wav");
  log(`speaking the sample (${(sample.length / 16000).toFixed(1)} s)`);
  client?.speak(sample);
};
$("mic").onclick = async () => {
  const b = $("mic"), on = b.getAttribute("aria-pressed") !== "true";
  try {
    if (on) await client.micOn(); else client.micOff();
    b.setAttribute("aria-pressed", String(on));
    b.textContent = on ? "● Mic on" : "● Mic off";
    log(`microphone ${on ? "on" : "off"}`);
  } catch (err) { log(`microphone: ${err.message}`, "error"); }
};
$("interrupt").onclick = () => { client?.interrupt(); log("interrupt"); };

function show(id, v) { $(id).textContent = v ?? "–"; }

function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

setInterval(async () => {
  if (!client || !stats.connected) return;
  const s = await client.stats();
  const now = performance.now();
  const rate = lastAt && s.bytes >= lastBytes ? ((s.bytes - lastBytes) * 8) / (now - lastAt) : null;
  const fps = s.fps ?? (lastAt ? ((s.framesDecoded - (stats._lastFrames || 0)) * 1000) / (now - lastAt) : null);
  stats._lastFrames = s.framesDecoded; lastBytes = s.bytes; lastAt = now;
  if (stats.transport === "webrtc") stats.webrtcFramesDecoded = s.framesDecoded;
  else stats.wsFramesDecoded = s.framesDecoded;
  stats.g2gMs = client.g2g;
  const lat = median(client.g2g) ?? s.rttMs;
  show("m-fps", fps == null ? null : fps.toFixed(1));
  show("m-latency", lat == null ? null : Math.round(lat));
  show("m-bitrate", rate == null ? null : Math.round(rate));
  const total = s.packetsReceived + s.packetsLost;
  show("m-loss", stats.transport === "ws" ? "n/a" : total ? `${((100 * s.packetsLost) / total).toFixed(1)}%` : "0%");
  show("m-dropped", s.dropped);
  show("m-ttff", stats.ttffMs);
}, 500);

setInterval(() => { if (stats.transport === "ws" && stats.connected) client?.ping(); }, 10000);

// the WebRTC path has no per-frame callback into the page; poll for the first frame
setInterval(() => {
  if (stats.transport === "webrtc" && client?.firstFrameAt !== undefined && stats.ttffMs === null) {
    stats.ttffMs = Math.round(client.firstFrameAt - connectClickedAt);
    log(`first frame after ${stats.ttffMs} ms`);
  }
}, 50);

document.querySelectorAll("input[name=transport]").forEach((r) => (r.onchange = () => setConnected(false)));
setConnected(false);
avatars.refresh();
log("ready — pick an avatar and a transport, and connect");
