"""The inference host (websocket_service/engines/musetalk/process.py) with a toy core.

The toy core (test/process_support.py) fills the k-th face of a job with ``pcm[k] % 256``, so a
face from the wrong slot or job shows; it holds results on request, so a full queue and pending
jobs at a crash are deterministic. Each spawn costs a few seconds here (the child imports the
musetalk package), so one process runner is shared by the module.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import numpy as np
import pytest

from websocket_service.engines.musetalk.core_loop import CoreLoop
from websocket_service.engines.musetalk.process import SHM_PREFIX, InferenceProcess, ThreadRunner
from websocket_service.errors import ModelNotFound, ProcessingError, RateLimitExceeded

from . import process_support

ROOT = Path(__file__).resolve().parent.parent
FACE = (8, 8, 3)
WINDOW = 16
SLOTS = 64
WAIT = 30.0  # seconds to wait on a future: generous for a busy 2-core machine
FACTORY = functools.partial(process_support.make_toy_core, FACE, 0.02)


def ours() -> set[str]:
    """This process's segments in /dev/shm."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}{os.getpid()}-")}


def make(kind: str, **kw: object) -> InferenceProcess | ThreadRunner:
    cls = InferenceProcess if kind == "process" else ThreadRunner
    kw.setdefault("slots", SLOTS)
    return cls(FACTORY, face_shape=FACE, window_samples=WINDOW, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runners() -> Iterator[dict[str, InferenceProcess | ThreadRunner]]:
    """One runner of each kind for the module: each spawn costs seconds here."""
    made = {kind: make(kind) for kind in ("process", "thread")}
    try:
        for r in made.values():
            r.start()
        yield made
    finally:
        for r in made.values():
            r.close()


@pytest.fixture(params=["process", "thread"])
def runner(request: pytest.FixtureRequest,
           runners: dict[str, InferenceProcess | ThreadRunner]) -> InferenceProcess | ThreadRunner:
    return runners[request.param]


def jobs(n: int, max_frames: int, seed: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(-32768, 32767, WINDOW, dtype=np.int16), int(rng.integers(1, max_frames + 1)))
            for _ in range(n)]


def expected(pcm: np.ndarray, n: int) -> np.ndarray:
    return np.stack([np.full(FACE, int(pcm[k]) % 256, np.uint8) for k in range(n)])


def run_held(r: InferenceProcess | ThreadRunner, work: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
    """Submit every job while the core holds its results, then release them in one step."""
    r.control("hold", True).result(WAIT)
    futures = [r.submit({"frames": n}, pcm, n) for pcm, n in work]
    r.control("hold", False).result(WAIT)
    return [f.result(WAIT) for f in futures]


def test_process_and_thread_give_identical_faces_batched_across_jobs(
        runners: dict[str, InferenceProcess | ThreadRunner]) -> None:
    work = jobs(20, 3, seed=1)
    out = {kind: run_held(r, work) for kind, r in runners.items()}
    for r in runners.values():  # the 20 jobs came back from one step of the core (one batch)
        assert r.control("batches").result(WAIT)[-1] == 20
    for (pcm, n), a, b in zip(work, out["process"], out["thread"], strict=True):
        assert a.shape == (n, *FACE) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, expected(pcm, n))
        np.testing.assert_array_equal(a, b)


def test_the_loop_reports_a_step_in_one_message() -> None:
    """Faces go straight into their jobs' slots; one "done" per step, not one per frame."""
    out = np.zeros((9, *FACE), np.uint8)
    inp = np.arange(8 * WINDOW, dtype=np.int16).reshape(8, WINDOW)
    sent: list[tuple] = []
    loop = CoreLoop(process_support.make_toy_core(FACE, 0.0), inp, out, sent.append)
    for j in range(4):
        loop.handle(("submit", 10 + j, {"frames": 2}, j, [7 - 2 * j, 6 - 2 * j]))
    loop.handle(("submit", 20, {"frames": 1, "fail": True}, 4, [8]))
    assert loop.step() == float("inf")
    assert sent == [("done", [10, 11, 12, 13], [(20, "toy failure of job 20")])]
    for j in range(4):
        assert out[7 - 2 * j, 0, 0, 0] == inp[j, 0] % 256 and out[6 - 2 * j, 0, 0, 0] == inp[j, 1] % 256


def test_many_threads_get_their_own_faces(runner: InferenceProcess | ThreadRunner) -> None:
    errors: list[BaseException] = []
    everyone: list[Future] = []  # every thread's jobs, to wait on when the queue is full

    def client(seed: int) -> None:
        try:
            pending: list[tuple[Future, np.ndarray, int]] = []
            for pcm, n in jobs(40, 4, seed):
                while True:
                    try:
                        pending.append((runner.submit({"frames": n}, pcm, n), pcm, n))
                        everyone.append(pending[-1][0])
                        break
                    except RateLimitExceeded:  # wait for a job to free its slots, then retry
                        if pending:
                            fut, old_pcm, old_n = pending.pop(0)
                            np.testing.assert_array_equal(fut.result(WAIT), expected(old_pcm, old_n))
                        else:  # slots are freed before futures resolve: none running, all free
                            running = [f for f in list(everyone) if not f.done()]
                            wait(running, WAIT, return_when=FIRST_COMPLETED)
            for fut, pcm, n in pending:
                np.testing.assert_array_equal(fut.result(WAIT), expected(pcm, n))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(10, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)


def test_full_slots_raise_at_once_and_free_up(runner: InferenceProcess | ThreadRunner) -> None:
    pcm = np.arange(WINDOW, dtype=np.int16)
    runner.control("hold", True).result(WAIT)
    held = [runner.submit({"frames": 16}, pcm, 16) for _ in range(SLOTS // 16)]
    t0 = time.monotonic()
    with pytest.raises(RateLimitExceeded) as info:
        runner.submit({"frames": 1}, pcm, 1)
    assert time.monotonic() - t0 < 0.5
    assert info.value.code == "RATE_LIMIT_EXCEEDED"
    assert info.value.details["free_output_slots"] == 0 and info.value.details["slots"] == SLOTS
    runner.control("hold", False).result(WAIT)
    for f in held:
        np.testing.assert_array_equal(f.result(WAIT), expected(pcm, 16))
    np.testing.assert_array_equal(runner.submit({"frames": 1}, pcm, 1).result(WAIT), expected(pcm, 1))
    with pytest.raises(ValueError, match="n_frames"):
        runner.submit({"frames": 1}, pcm, SLOTS + 1)
    with pytest.raises(ValueError, match="int16"):
        runner.submit({"frames": 1}, pcm.astype(np.float32), 1)


def test_control_and_job_errors_come_back(runner: InferenceProcess | ThreadRunner) -> None:
    assert runner.control("echo", 1, "a").result(WAIT) == (1, "a")
    with pytest.raises(ProcessingError, match="ValueError: boom"):
        runner.control("raise", "boom").result(WAIT)
    with pytest.raises(ModelNotFound) as info:  # our own errors keep their class and details
        runner.control("missing", "alice").result(WAIT)
    assert info.value.details == {"avatar_id": "alice"}
    if isinstance(runner, InferenceProcess):
        with pytest.raises(ProcessingError, match="cannot be sent back"):
            runner.control("unpicklable").result(WAIT)
    pcm = np.arange(WINDOW, dtype=np.int16)
    good = runner.submit({"frames": 2}, pcm, 2)
    failed = runner.submit({"frames": 2, "fail": True}, pcm, 2)
    rejected = runner.submit({"frames": 2, "reject": "no avatar"}, pcm, 2)
    with pytest.raises(ProcessingError, match="toy failure"):
        failed.result(WAIT)
    with pytest.raises(ProcessingError, match="KeyError"):
        rejected.result(WAIT)
    np.testing.assert_array_equal(good.result(WAIT), expected(pcm, 2))
    assert runner.alive  # a job's failure is not the core's


def test_crash_fails_pending_restarts_and_leaks_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    before = ours()
    crashes: list[str] = []
    restarted = threading.Event()

    def on_restart() -> None:  # controls work before submits reopen, e.g. re-sending avatars
        assert r.control("echo", "again").result(WAIT) == ("again",)
        restarted.set()

    r = make("process", slots=16, on_crash=crashes.append, on_restart=on_restart,
             backoff_s=(0.05,))
    try:
        first = r.start()
        segments = ours() - before
        assert len(segments) == 2
        pcm = np.arange(WINDOW, dtype=np.int16)
        r.control("hold", True).result(WAIT)
        pending = [r.submit({"frames": 2}, pcm, 2) for _ in range(3)]
        pending.append(r.control("crash"))
        for f in pending:
            with pytest.raises(ProcessingError, match="the inference process stopped: exit code 3") as info:
                f.result(WAIT)
            assert info.value.code == "PROCESSING_ERROR"
        assert crashes == ["exit code 3"]
        assert r.wait_alive(WAIT) and restarted.is_set()
        assert r.restarts == 1 and r.info["pid"] != first["pid"]
        np.testing.assert_array_equal(r.submit({"frames": 2}, pcm, 2).result(WAIT), expected(pcm, 2))
        assert ours() - before == segments  # the same two segments, reused
    finally:
        r.close()
    r.close()  # idempotent
    assert ours() == before
    with pytest.raises(ProcessingError, match="closed"):
        r.submit({"frames": 1}, np.zeros(WINDOW, np.int16), 1)
    err = capfd.readouterr().err
    assert "leaked" not in err and "resource_tracker" not in err


def test_a_core_that_breaks_fails_its_jobs_on_the_thread_runner() -> None:
    r = make("thread")
    r.start()
    try:
        r.control("hold", True).result(WAIT)
        job = r.submit({"frames": 1}, np.zeros(WINDOW, np.int16), 1)
        r.control("break_step")
        with pytest.raises(ProcessingError, match="the inference thread stopped: RuntimeError"):
            job.result(WAIT)
        assert not r.alive
    finally:
        r.close()


@pytest.mark.parametrize("cls", [InferenceProcess, ThreadRunner])
def test_a_factory_error_reaches_start(cls: type) -> None:
    before = ours()
    r = cls(process_support.broken_factory, face_shape=FACE, window_samples=WINDOW, slots=4)
    with pytest.raises(ModelNotFound, match="no taesd folder") as info:
        r.start()
    assert info.value.fatal and info.value.details == {"file": "/nowhere/taesd"}
    r.close()
    assert ours() == before


SCRIPT = textwrap.dedent("""
    import functools, os, sys
    import numpy as np
    from test import process_support
    from websocket_service.engines.musetalk.process import SHM_PREFIX, InferenceProcess

    def main():
        factory = functools.partial(process_support.make_toy_core, (8, 8, 3), 0.0)
        r = InferenceProcess(factory, face_shape=(8, 8, 3), window_samples=16, slots=4,
                             backoff_s=(0.0,))
        r.start()
        r.control("hold", True).result(30)
        job = r.submit({"frames": 1}, np.ones(16, np.int16), 1)
        r.control("break_step")  # the child dies of a bug in its core, then restarts
        try:
            job.result(30)
        except Exception as exc:
            print(exc, file=sys.stderr)
        assert r.wait_alive(30) and r.restarts == 1
        assert r.submit({"frames": 1}, np.ones(16, np.int16), 1).result(30)[0, 0, 0, 0] == 1
        names = [n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}{os.getpid()}-")]
        print(os.getpid(), r.info["pid"], len(names), flush=True)  # never closed: atexit's job

    if __name__ == "__main__":
        main()
""")


def test_a_server_that_exits_leaves_no_segment_and_no_tracker_warning(tmp_path: Path) -> None:
    """In its own interpreter, so that the resource tracker's verdict at exit is visible."""
    script = tmp_path / "server.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    pid, child, names = map(int, done.stdout.split())
    assert names == 2  # the same two segments after the restart, there until the exit
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}{pid}-")]
    assert not Path(f"/proc/{child}").exists()
    assert "the inference process stopped: RuntimeError: the toy core broke (exit code 1)" in done.stderr
    for bad in ("leaked", "resource_tracker", "KeyError", "Warning"):
        assert bad not in done.stderr, done.stderr
