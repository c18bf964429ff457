"""The pipecat bot end to end in real headless Chromium, offline.

The bot's own client page (``/client/``) connects over SmallWebRTC; Chromium's fake
microphone plays speech built from ``fixtures/`` (the file loops); the real Silero VAD hears
each phrase end and the offline echo bot has the avatar repeat it. Everything about the
avatar is measured *in the page*: each decoded frame of the ``<video>`` is drawn to a canvas
(``requestVideoFrameCallback``) and the share of dark pixels in the avatar's mouth box read
back, next to the level of the bot's audio as the page plays it (WebAudio), and the decoded
frame rate comes from ``getStats``.
"""

from __future__ import annotations

import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from bench.mouth_metrics import loudness_envelope, mouth_box, pearson

from .browser import ARGS, CHROMIUM
from .geometric_support import wav
from .test_pipecat_webrtc import bot_server

RATE = 16000
FRAME = 640  # 40 ms at 16 kHz

# Installed in the page after it connected: per presented video frame, [performance.now() of
# presentation, dark share of the mouth box, mean luma of the box, RMS of the bot's audio].
MEASURE = """(box) => {
  const v = window.avatarClient.video;
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const audio = new AudioContext();
  const analyser = audio.createAnalyser();
  analyser.fftSize = 1024;
  audio.createMediaStreamSource(v.srcObject).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  const out = (window.__frames = []);
  const onFrame = (now, meta) => {
    const w = v.videoWidth, h = v.videoHeight;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.drawImage(v, 0, 0, w, h);
    const sx = w / box.width, sy = h / box.height;
    const x0 = Math.round(box.x0 * sx), y0 = Math.round(box.y0 * sy);
    const px = ctx.getImageData(x0, y0, Math.round(box.x1 * sx) - x0,
                                Math.round(box.y1 * sy) - y0).data;
    let dark = 0, sum = 0;
    for (let i = 0; i < px.length; i += 4) {
      const y = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
      sum += y;
      if (y < 70) dark++;
    }
    analyser.getFloatTimeDomainData(buf);
    let e = 0;
    for (const s of buf) e += s * s;
    const n = px.length / 4;
    out.push([meta.expectedDisplayTime, dark / n, sum / n, Math.sqrt(e / buf.length)]);
    v.requestVideoFrameCallback(onFrame);
  };
  v.requestVideoFrameCallback(onFrame);
}"""

# barge_ins() in the page, for wait_for_function: leaves the count in ``n``
BARGE_INS_JS = """let speaking = false, n = 0;
for (const e of window.avatarClient.events) {
  if (e.type === "bot-started-speaking") speaking = true;
  else if (e.type === "bot-stopped-speaking") speaking = false;
  else if (e.type === "vad-user-started-speaking" && speaking) n++;
}"""

VIDEO_STATS = """async () => {
  const out = {};
  for (const s of (await window.avatarClient.pc.getStats()).values()) {
    if (s.type === "inbound-rtp") out[s.kind] = s;
  }
  return { t: performance.now(), video: out.video, audio: out.audio };
}"""


def phrases(pcm: np.ndarray) -> list[np.ndarray]:
    """The phrases of a recording: runs of 40 ms frames louder than -40 dBFS."""
    loud = loudness_envelope(pcm) > -40
    edges = np.flatnonzero(np.diff(np.r_[0, loud.astype(int), 0]))
    return [pcm[a * FRAME:b * FRAME] for a, b in zip(edges[::2], edges[1::2], strict=True)]


def write_wav(path: Path, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype(np.int16).tobytes())
    return path


def with_gaps(parts: list[np.ndarray], gap_s: float, lead_s: float = 1.0) -> np.ndarray:
    gap = np.zeros(int(gap_s * RATE), np.int16)
    return np.concatenate([np.zeros(int(lead_s * RATE), np.int16),
                           *[x for p in parts for x in (p, gap)]])


TOKEN = "browser-test-token"


@pytest.fixture
def bot(tmp_path: Path) -> Iterator[tuple[str, dict[str, float]]]:
    # with a token, as when it serves beyond localhost: the page passes on its ?token=
    with bot_server(tmp_path / "avatars", auth_token=TOKEN) as (url, bots):
        avatar = bots.shared.avatar
        x0, y0, x1, y1 = mouth_box(avatar.meta["face_box"], (avatar.height, avatar.width))
        yield url, {"x0": x0, "y0": y0, "x1": x1, "y1": y1,
                    "width": avatar.width, "height": avatar.height}


@contextmanager
def open_bot(mic_wav: Path, url: str, box: dict[str, float]) -> Iterator[Page]:
    """Chromium whose microphone plays ``mic_wav`` (looped), on the bot's page, connected."""
    args = [*ARGS, f"--use-file-for-fake-audio-capture={mic_wav}"]
    with sync_playwright() as pw:
        browser: Browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            elsewhere: list[str] = []  # offline: the page may ask nothing of anyone but the bot
            page.on("request", lambda r: None if r.url.startswith(url + "/")
                    else elsewhere.append(r.url))
            page.goto(f"{url}/?token={TOKEN}")
            assert page.url == f"{url}/client/?token={TOKEN}"
            page.click("#connect")
            page.wait_for_function("window.avatarClient.events.some(e => e.type === 'bot-ready')",
                                   timeout=30_000)
            page.wait_for_function("window.avatarClient.video.srcObject?.getTracks().length === 2"
                                   " && window.avatarClient.video.videoWidth > 0",
                                   timeout=30_000)
            assert page.evaluate("fetch('/api/ice-servers').then(r => r.status)") == 401
            assert page.evaluate(f"fetch('/api/ice-servers?token={TOKEN}').then(r => r.json())") \
                == {"iceServers": []}
            page.evaluate(MEASURE, box)
            yield page
            page.click("#disconnect")
            assert page.locator("#conn").inner_text() == "disconnected"
            assert not errors, errors
            assert not elsewhere, elsewhere
        finally:
            browser.close()


def events(page: Page, kind: str) -> list[float]:
    return page.evaluate(f"window.avatarClient.events.filter(e => e.type === '{kind}')"
                         ".map(e => e.t)")


def frames(page: Page) -> np.ndarray:
    """[time ms, dark share, mean luma, audio RMS] per presented frame."""
    return np.array(page.evaluate("window.__frames"), np.float64)


def level_db(rms: np.ndarray) -> np.ndarray:
    return np.maximum(20 * np.log10(rms + 1e-9), -60.0)


def lag_correlation(mouth: np.ndarray, audio_db: np.ndarray,
                    max_lag: int = 15) -> tuple[int, float]:
    """(lag, r) of the best Pearson r of mouth[i] against audio[i + lag]."""
    best = (0, -1.0)
    for lag in range(-max_lag, max_lag + 1):
        a = mouth[max(0, -lag):len(mouth) - max(0, lag)]
        b = audio_db[max(0, lag):len(audio_db) - max(0, -lag)]
        r = pearson(a, b)
        if r > best[1]:
            best = (lag, r)
    return best


def rate(before: dict[str, Any], after: dict[str, Any]) -> float:
    return 1000 * (after["video"]["framesDecoded"] - before["video"]["framesDecoded"]) \
        / (after["t"] - before["t"])


def mean_buffer_ms(stats: dict[str, Any]) -> float:
    return 1000 * stats["jitterBufferDelay"] / max(stats["jitterBufferEmittedCount"], 1)


def test_browser_hears_the_user_and_the_avatar_lip_syncs_the_echo(
        bot: tuple[str, dict[str, float]], tmp_path: Path) -> None:
    url, box = bot
    mic = write_wav(tmp_path / "mic.wav", with_gaps(phrases(wav("speech_pauses_16k.wav")), 4.0))
    with open_bot(mic, url, box) as page:
        before = page.evaluate(VIDEO_STATS)
        # two whole replies: the user spoke, the VAD heard it end, the avatar echoed it
        page.wait_for_function("window.avatarClient.events.filter("
                               "e => e.type === 'bot-stopped-speaking').length >= 2",
                               timeout=60_000)
        after = page.evaluate(VIDEO_STATS)
        assert events(page, "vad-user-started-speaking"), "the VAD heard the user"
        assert page.locator("#state").inner_text() in ("listening", "user speaking", "thinking")
        f = frames(page)
        page.click("#mic")  # mute: the track sends silence
        assert page.evaluate("window.avatarClient.micOn") is False
        assert page.locator("#mic").inner_text() == "Mic on"
    fps = rate(before, after)
    audio_db = level_db(f[:, 3])
    lag, r = lag_correlation(f[:, 1], audio_db)
    interval = float(np.median(np.diff(f[:, 0])))
    lead_ms = lag * interval  # > 0: the mouth moves before the page plays the sound
    buffers = mean_buffer_ms(after["video"]) - mean_buffer_ms(after["audio"])
    # the sender's clock (RTCP sender reports) of what plays now: > 0, the video is ahead
    playout = after["video"].get("estimatedPlayoutTimestamp", 0) \
        - after["audio"].get("estimatedPlayoutTimestamp", 0)
    opening, speech, silence = relative_opening(f, audio_db, lag)
    quiet = opening[silence].mean() / max(opening[speech].mean(), 1e-9)
    print(f"\nbrowser: {fps:.1f} fps decoded, {1000 / interval:.1f} fps presented, {len(f)} "
          f"frames; mouth vs audio level r = {r:.2f} at a lag of {lag} frames (video ahead of "
          f"audio by {lead_ms:.0f} ms); mouth in silence / in speech {quiet:.3f}; jitter "
          f"buffers video - audio {buffers:+.0f} ms; estimated playout video - audio "
          f"{playout:+.0f} ms")
    assert speech.sum() > 25, "the page played the bot's speech"
    assert fps >= 24, f"{fps:.1f} fps decoded in the page"
    assert r >= 0.6, f"mouth vs audio r = {r:.2f}"
    assert quiet < 0.3, f"the mouth stays open in silence: {quiet:.3f}"
    assert abs(lead_ms) <= 400, f"A/V offset {lead_ms:.0f} ms"


def relative_opening(f: np.ndarray, audio_db: np.ndarray,
                     lag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mouth opening over the idle avatar's, speech frames, silent frames), frames aligned
    with the audio ``lag`` frames later; idle is the median dark share in silence."""
    n = len(f) - abs(lag)
    mouth = f[max(0, -lag):, 1][:n]
    level = audio_db[max(0, lag):][:n]
    silence, speech = level < -55, level > -35
    return np.maximum(0.0, mouth - np.median(mouth[silence])), speech, silence


def barge_ins(page: Page) -> list[float]:
    """When the VAD heard the user start while the bot was speaking (page time, ms)."""
    speaking, out = False, []
    for e in page.evaluate("window.avatarClient.events.map(e => [e.type, e.t])"):
        if e[0] == "bot-started-speaking":
            speaking = True
        elif e[0] == "bot-stopped-speaking":
            speaking = False
        elif e[0] == "vad-user-started-speaking" and speaking:
            out.append(e[1])
    return out


def test_speaking_over_the_avatar_in_the_browser_sends_it_back_to_idle(
        bot: tuple[str, dict[str, float]], tmp_path: Path) -> None:
    """The phrase repeats 0.7 s after it ends: the user speaks again over the echo of it."""
    url, box = bot
    phrase = phrases(wav("speech_pauses_16k.wav"))[1]  # "How are you today?", 1.1 s
    mic = write_wav(tmp_path / "mic.wav", with_gaps([phrase], 0.7, lead_s=0))
    with open_bot(mic, url, box) as page:
        page.wait_for_function(f"(() => {{ {BARGE_INS_JS} return n >= 2; }})()", timeout=60_000)
        last = barge_ins(page)[-1]
        page.wait_for_function(f"window.__frames.at(-1)[0] > {last + 1200}", timeout=30_000)
        f, cuts = frames(page), barge_ins(page)
        starts = np.array(events(page, "bot-started-speaking"))
    audio_db = level_db(f[:, 3])
    idle = np.median(f[audio_db < -55, 1])
    speech_mouth = np.percentile(f[audio_db > -35, 1], 90)
    for cut in cuts:
        t = f[:, 0] - cut
        reply = starts[starts > cut].min(initial=cut + 1200) - cut  # the next reply starts
        after = (t > 400) & (t < reply)
        assert after.sum() >= 8, f"{after.sum()} frames between the barge-in and the next reply"
        assert audio_db[(t > -600) & (t <= 0)].max() > -30, "the avatar was speaking"
        open_mouth = idle + 0.25 * (speech_mouth - idle)
        loud = t[(t > 0) & (t < reply) & (audio_db > -45)]
        moving = t[(t > 0) & (t < reply - 150) & (f[:, 1] >= open_mouth)]
        print(f"\nbarge-in: after the VAD heard the user, the page's audio was silent within "
              f"{loud.max(initial=0):.0f} ms, the mouth closed within "
              f"{moving.max(initial=0):.0f} ms; mouth {f[after, 1].max():.3f} (idle {idle:.3f}, speaking {speech_mouth:.3f}) "
              f"until the next reply {reply:.0f} ms after")
        assert audio_db[after].max() < -45, "the avatar stopped talking"
        assert f[after, 1].max() < open_mouth, "the mouth is idle"
