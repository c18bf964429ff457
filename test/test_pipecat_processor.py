"""MuseTalkProcessor offline, through pipecat's own test pipeline (``run_test``).

Real engine (weight-free), real built-in avatar, real pipecat pipeline; what comes out of
the processor is classified by what follows each image: a speech image is followed by
exactly its 40 ms of audio, an idle image is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import soxr
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from bench.mouth_metrics import evaluate
from websocket_service.cursor import pingpong
from websocket_service.pipecat import MuseTalkProcessor

from .geometric_support import builtin, engine, wav


def processor() -> MuseTalkProcessor:
    return MuseTalkProcessor(engine=engine(), avatar=builtin())


def tts(pcm: np.ndarray, rate: int = 16000, chunk: int = 1000) -> list[Frame]:
    """A TTS reply: started, the audio in ``chunk``-sample pieces, stopped."""
    pieces = [TTSAudioRawFrame(pcm[i:i + chunk].tobytes(), rate, 1)
              for i in range(0, len(pcm), chunk)]
    return [TTSStartedFrame(), *pieces, TTSStoppedFrame()]


def split(down: Sequence[Frame]) -> tuple[list[np.ndarray], list[bytes], list[np.ndarray]]:
    """(speech images, their audio, idle images) in the order they came out."""
    speech: list[np.ndarray] = []
    audio: list[bytes] = []
    idle: list[np.ndarray] = []
    for i, f in enumerate(down):
        if not isinstance(f, OutputImageRawFrame):
            continue
        assert f.sync_with_audio and f.format == "RGB"
        img = np.frombuffer(f.image, np.uint8).reshape(f.size[1], f.size[0], 3)
        nxt = down[i + 1] if i + 1 < len(down) else None
        if isinstance(nxt, TTSAudioRawFrame):
            speech.append(img)
            audio.append(nxt.audio)
        else:
            idle.append(img)
    return speech, audio, idle


async def test_one_image_per_40_ms_of_speech_with_its_audio_right_after() -> None:
    pcm = wav("short_16k.wav")
    proc = processor()
    down, _ = await run_test(proc, frames_to_send=tts(pcm, chunk=777), start_timeout=10)
    speech, audio, _ = split(down)
    assert len(speech) == proc.speech_images == -(-len(pcm) // 640)
    assert all(len(a) == 1280 for a in audio)
    played = np.frombuffer(b"".join(audio), np.int16)
    assert np.array_equal(played[:len(pcm)], pcm) and not played[len(pcm):].any()
    kinds = [type(f) for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]
    assert kinds == [TTSStartedFrame, TTSStoppedFrame]
    last_audio = max(i for i, f in enumerate(down) if isinstance(f, TTSAudioRawFrame))
    assert isinstance(down[last_audio + 1], TTSStoppedFrame), "TTSStopped follows the last image"


async def test_lips_follow_the_audio_and_close_in_pauses() -> None:
    pcm = wav("speech_pauses_16k.wav")
    down, _ = await run_test(processor(), frames_to_send=[SleepFrame(0.2), *tts(pcm, chunk=16000)],
                             start_timeout=10)
    speech, _, idle = split(down)
    assert len(speech) == -(-len(pcm) // 640)
    result = evaluate(speech, pcm, builtin().meta["face_box"], [idle[0]] * len(speech))
    assert result["r"] >= 0.6, result
    assert result["silence_ratio"] < 0.2, result


async def test_24_khz_tts_in_odd_chunks() -> None:
    pcm16 = wav("speech_pauses_16k.wav")
    pcm24 = soxr.resample(pcm16, 16000, 24000).astype(np.int16)
    proc = processor()
    down, _ = await run_test(proc, frames_to_send=[SleepFrame(0.2), *tts(pcm24, 24000, 1111)],
                             start_timeout=10)
    speech, audio, idle = split(down)
    assert len(speech) == -(-len(pcm24) // 960)  # duration x 25
    out = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert {(f.sample_rate, f.num_channels) for f in out} == {(24000, 1)}
    played = np.frombuffer(b"".join(audio), np.int16)
    assert np.array_equal(played[:len(pcm24)], pcm24), "the listener hears the original 24 kHz"
    result = evaluate(speech, pcm16, builtin().meta["face_box"], [idle[0]] * len(speech))
    assert result["r"] >= 0.6, result


async def test_interruption_drops_buffered_speech_and_goes_back_to_idle() -> None:
    pcm = np.tile(wav("short_16k.wav"), 4)
    proc = processor()
    frames = [*tts(pcm, chunk=4000)[:-1], SleepFrame(0.5), InterruptionFrame(), SleepFrame(0.5)]
    down, _ = await run_test(proc, frames_to_send=frames, start_timeout=10)
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before, after = split(down[:cut]), split(down[cut:])
    assert 0 < len(before[0]) < -(-len(pcm) // 640), "interrupted part-way"
    assert after[0] == [] and len(after[2]) > 0, "only idle images after the interruption"
    assert not any(isinstance(f, TTSAudioRawFrame) for f in down[cut:])


async def test_idle_loop_plays_the_base_video_and_other_frames_pass_through() -> None:
    clip = builtin().clip("idle").frames
    down, _ = await run_test(processor(), frames_to_send=[TextFrame("hello"), SleepFrame(0.6)],
                             start_timeout=10)
    speech, _, idle = split(down)
    assert speech == [] and len(idle) >= 5
    for k, img in enumerate(idle):
        assert np.array_equal(img, clip[pingpong(k, len(clip))]), k
    assert [f.text for f in down if isinstance(f, TextFrame)] == ["hello"]


async def test_generate_video_frame_opens_the_mouth_for_a_vowel_only() -> None:
    proc = processor()
    vowel = wav("vowel_ee_16k.wav")
    loud = await proc.generate_video_frame(vowel[3200:3840])
    quiet = await proc.generate_video_frame(np.zeros(640, np.int16))
    clip = builtin().clip("idle").frames
    assert loud.size == quiet.size == (builtin().width, builtin().height)
    as_img = [np.frombuffer(f.image, np.uint8).reshape(clip.shape[1:]) for f in (loud, quiet)]
    assert not np.array_equal(as_img[0], clip[0])
    assert np.array_equal(as_img[1], clip[1])


async def test_a_reply_without_tts_stopped_ends_after_the_speech_gap() -> None:
    pcm = wav("short_16k.wav")
    frames = tts(pcm, chunk=1600)[1:-1]  # audio only: no TTSStartedFrame, no TTSStoppedFrame
    down, _ = await run_test(processor(), frames_to_send=[*frames, SleepFrame(1.5),
                                                           TextFrame("later")],
                             start_timeout=10)
    marker = next(i for i, f in enumerate(down) if isinstance(f, TextFrame))
    speech, _, _ = split(down[:marker])
    assert len(speech) == -(-len(pcm) // 640), "all of it shown before the bot went on"
