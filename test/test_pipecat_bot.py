"""The runnable bot: its offline echo pipeline (real Silero VAD), its CLI, and the Daily path
(constructed with the daily extra installed; joining a room needs Daily's cloud)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    InputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.tests.utils import run_test
from pipecat.transports.daily.transport import (
    DailyInputTransport,
    DailyOutputTransport,
    DailyParams,
    DailyTransport,
)

from websocket_service.config import Settings
from websocket_service.pipecat import MuseTalkProcessor
from websocket_service.pipecat.bot import daily_transport, daily_worker, load_config, parse_args
from websocket_service.pipecat.pipeline import EchoSpeech, avatar_service, transport_params
from websocket_service.pipecat.remote import RemoteMuseTalkProcessor

from .geometric_support import builtin, engine, wav

ROOT = Path(__file__).resolve().parent.parent


def mic(pcm: np.ndarray, piece: int = 320) -> list[InputAudioRawFrame]:
    return [InputAudioRawFrame(pcm[i:i + piece].tobytes(), 16000, 1)
            for i in range(0, len(pcm), piece)]


async def test_the_avatar_repeats_what_the_vad_heard_with_lip_sync() -> None:
    speech = wav("short_16k.wav")
    silence = np.zeros(16000, np.int16)
    echo = EchoSpeech()
    avatar = MuseTalkProcessor(engine=engine(), avatar=builtin())
    pipeline = Pipeline([VADProcessor(vad_analyzer=SileroVADAnalyzer()), echo, avatar])
    down, _ = await run_test(pipeline, frames_to_send=mic(np.concatenate([silence, speech,
                                                                           silence, silence])),
                             start_timeout=10)
    assert echo.replies == 1
    assert not any(isinstance(f, InputAudioRawFrame) for f in down), "the mic is not echoed raw"
    reply = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    played = np.frombuffer(b"".join(f.audio for f in reply), np.int16)
    # the reply holds the user's speech up to its last loud sample, sample for sample
    # (preceded by part of the preroll; the recording started and ends on 20 ms pieces)
    voiced = speech[:len(speech) - int(np.argmax(np.abs(speech[::-1]) > 300))]
    starts = [o for o in range(0, len(played), 320)
              if np.array_equal(played[o:o + len(voiced)], voiced)]
    assert len(starts) == 1 and len(played) < len(silence) + len(speech) + len(silence)
    assert avatar.speech_images == len(reply) == -(-len(played) // 640)
    kinds = [type(f) for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]
    assert kinds == [TTSStartedFrame, TTSStoppedFrame]
    assert any(isinstance(f, OutputImageRawFrame) for f in down)


def test_cli_takes_the_seed_options(tmp_path: Path) -> None:
    env = tmp_path / "bot.env"
    env.write_text("ENGINE=geometric\nDEFAULT_AVATAR=alice\nDEFAULT_WIDTH=256\n")
    args = parse_args(["--room-url", "https://example.daily.co/r", "--token", "t",
                       "--config", str(env), "--verbose", "--skip-checks"])
    assert (args.room_url, args.token, args.verbose, args.skip_checks) == \
        ("https://example.daily.co/r", "t", True, True)
    config = load_config(args.config)
    assert (config.engine, config.default_avatar, config.default_width) == ("geometric", "alice", 256)
    out = subprocess.run([sys.executable, "start_pipecat_server.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for option in ("--room-url", "--token", "--config", "--verbose", "--skip-checks"):
        assert option in out


async def test_daily_transport_and_pipeline_are_built_for_the_avatar() -> None:
    params = transport_params(DailyParams, 256, 256)
    assert (params.video_out_enabled, params.video_out_is_live) == (True, False)
    assert (params.video_out_width, params.video_out_height) == (256, 256)
    assert params.audio_in_enabled and params.audio_out_enabled
    transport = daily_transport("https://example.daily.co/room", "token", 256, 256)
    assert isinstance(transport, DailyTransport)
    assert isinstance(transport.input(), DailyInputTransport)
    assert isinstance(transport.output(), DailyOutputTransport)
    worker = daily_worker(transport, MuseTalkProcessor(engine=engine(), avatar=builtin()))
    assert isinstance(worker, PipelineWorker)


def test_avatar_server_url_renders_on_a_remote_server(monkeypatch) -> None:
    monkeypatch.setenv("AVATAR_SERVER_URL", "ws://gpu-host:8000")
    monkeypatch.setenv("AVATAR_SERVER_TOKEN", "secret")
    remote = avatar_service(Settings(default_width=256, default_height=256))
    assert isinstance(remote, RemoteMuseTalkProcessor)
    assert (remote.client.url, remote.client.auth_token, remote.client.resolution) == \
        ("ws://gpu-host:8000", "secret", "256x256")
    monkeypatch.delenv("AVATAR_SERVER_URL")
    assert isinstance(avatar_service(Settings()), MuseTalkProcessor)
