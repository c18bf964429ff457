"""End-to-end check of the command-line test client against the real app on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import av
import pytest

from .live_server import LiveServer, free_port
from .test_client import main as client_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(make_server: Callable[..., LiveServer]) -> str:
    return make_server().ws


def test_client_streams_short_wav_and_writes_mp4(server: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.mp4"
    code = client_main(["--server", server, "--user-id", "pytest", "--audio-file",
                        str(ROOT / "fixtures" / "short_16k.wav"), "--out", str(out),
                        "--lead-s", "0.3", "--tail-s", "0.8", "--quiet", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["speaking_frames"] == 30 == summary["expected_speaking_frames"]
    assert summary["index_gaps"] == 0  # every frame of the paced stream, in order
    assert summary["decode_errors"] == 0
    assert summary["frames_decoded"] == summary["frames_received"]
    assert summary["latency_ms"]["samples"] == 30
    assert out.is_file()
    with av.open(str(out)) as container:
        assert container.streams.audio, "no audio stream in the MP4"
        frames = sum(1 for _ in container.decode(video=0))
    assert frames >= summary["speaking_frames"]


def test_client_reconnects_when_its_session_is_lost(make_server: Callable[..., LiveServer],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--reconnect``: the server ends the first session (as a dying replica would drop it);
    the client says so, opens a new one after its back-off and streams the audio there."""
    server = make_server()
    sessions = server.services.sessions
    ended: list[str] = []

    def end_the_first_session() -> None:
        deadline = time.monotonic() + 20
        while not sessions.sessions:  # the client's INIT, in the server's thread
            assert time.monotonic() < deadline, "the client opened no session"
            time.sleep(0.01)
        ended.append(next(iter(sessions.sessions)))
        asyncio.run_coroutine_threadsafe(sessions.close(ended[0]), server.loop).result(10)

    ender = threading.Thread(target=end_the_first_session)
    ender.start()
    code = client_main(["--server", server.ws, "--user-id", "pytest", "--audio-file",
                        str(ROOT / "fixtures" / "short_16k.wav"), "--lead-s", "1.0",
                        "--tail-s", "0.3", "--quiet", "--json", "--reconnect", "2"])
    ender.join()
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert code == 0 and summary["reconnects"] == 1, out.err
    assert "connection lost" in out.err and "reconnected: session" in out.err
    assert ended[0] not in out.err.split("reconnected: session")[1]  # a new session
    assert summary["speaking_frames"] == 30 == summary["expected_speaking_frames"]


def test_client_reports_unreachable_server(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    code = client_main(["--server", f"ws://127.0.0.1:{port}", "--audio-file",
                        str(ROOT / "fixtures" / "short_16k.wav"), "--quiet"])
    assert code == 3
