"""A compute core hosted in its own process (``InferenceProcess``) or a thread (``ThreadRunner``).

Why a process: the networks, whisper and the scheduler must not share a GIL with the event
loop, blending and encoding (issue 21: the worker's batches ran 4x slower while streaming).
Why shared memory: a face is 196 KB; pickled through a pipe it would be copied twice and cost
the parent's reader thread its time. The pipes carry only small tuples:

  parent -> child   ("submit", job_id, meta, in_slot, out_slots) | ("control", call_id, method,
                    args) | ("stop",)
  child -> parent   ("info", dict) once | ("done", job_ids, [(job_id, message)]) at most once per
                    step | ("result", call_id, ok, value or error) | ("fatal", error) before dying

The parent owns both rings (``slots`` PCM windows in, ``slots`` faces out) and hands out their
slots; a job holds one input slot and one output slot per frame until its faces are copied out.
The core's side (the loop, the child's main) is ``core_loop.py``. Neither module imports torch,
so the server imports them cheaply; the core may, in the child.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import multiprocessing
import multiprocessing.util  # noqa: F401 - first, so our atexit hook runs before its join
import os
import queue
import secrets
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Protocol

import numpy as np

from ...errors import ProcessingError, RateLimitExceeded
from .core_loop import Core, CoreLoop, child_main, decode_error, encode_error, pipe_receive, rings

__all__ = ["SHM_PREFIX", "Core", "InferenceProcess", "Runner", "ThreadRunner"]

log = logging.getLogger(__name__)

#: /dev/shm names are f"{SHM_PREFIX}{server pid}-{random}-in|out", so leaks are easy to spot
SHM_PREFIX = "avatar-infer-"
#: a child that ran this long before crashing resets the back-off to its first step
HEALTHY_S = 60.0
_MAX_DRAIN = 256  # ThreadRunner: messages handled before the core steps again


class Runner(Protocol):
    """What the engine uses; ``InferenceProcess`` and ``ThreadRunner`` implement it."""

    restarts: int

    @property
    def alive(self) -> bool: ...
    def start(self) -> dict[str, Any]: ...
    def control(self, method: str, *args: Any) -> Future: ...
    def submit(self, meta: dict[str, Any], pcm: np.ndarray, n_frames: int) -> Future: ...
    def close(self) -> None: ...


def _resolve(fut: Future, value: Any = None, exc: BaseException | None = None) -> None:
    """Set a future unless its caller cancelled it (asyncio.wrap_future cancels it through)."""
    try:
        fut.set_exception(exc) if exc is not None else fut.set_result(value)
    except InvalidStateError:
        pass


@dataclass
class _Job:
    future: Future
    in_slot: int
    out_slots: list[int]


class _Host:
    """The parent's side, shared by both runners: slots, futures, and turning messages from the
    core's loop into results."""

    def __init__(self, factory: Callable[[], Core], face_shape: tuple[int, ...],
                 window_samples: int, slots: int) -> None:
        if slots < 1 or window_samples < 1:
            raise ValueError("slots and window_samples must be >= 1")
        self._factory = factory
        self.face_shape, self.window_samples, self.slots = tuple(face_shape), window_samples, slots
        self._lock = threading.Lock()        # slots, jobs, calls, state
        self._send_lock = threading.Lock()   # one writer on the pipe at a time
        self._free_in = list(range(slots))   # LIFO: a few hot slots, few shared pages touched
        self._free_out = list(range(slots))
        self._jobs: dict[int, _Job] = {}
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._gen = 0                        # bumped on a crash/close: stale sends are dropped
        self._tx: Any = None                 # has .send(msg) while a core listens
        self._accepting = False
        self._alive_evt = threading.Event()
        self._inp: np.ndarray
        self._out: np.ndarray
        self._down = "the inference runner is not started"
        self.restarts = 0
        self.info: dict[str, Any] = {}

    @property
    def alive(self) -> bool:
        """True while submits are accepted."""
        return self._accepting

    @property
    def jobs_in_flight(self) -> int:
        """Jobs submitted and not yet answered (the parent's count: no round trip)."""
        with self._lock:
            return len(self._jobs)

    def wait_alive(self, timeout: float | None = None) -> bool:
        """Wait until submits are accepted again (after a restart and its ``on_restart``)."""
        return self._alive_evt.wait(timeout)

    def submit(self, meta: dict[str, Any], pcm: np.ndarray, n_frames: int) -> Future:
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16 or pcm.shape != (self.window_samples,):
            raise ValueError(f"pcm must be int16 [{self.window_samples}], not {pcm.dtype} {pcm.shape}")
        if not 1 <= n_frames <= self.slots:
            raise ValueError(f"n_frames must be in 1..{self.slots}, not {n_frames}")
        fut: Future = Future()
        with self._lock:
            if not self._accepting:
                raise ProcessingError(self._down, {"reason": "inference_down"})
            if not self._free_in or len(self._free_out) < n_frames:
                raise RateLimitExceeded("the inference queue is full", {
                    "jobs_in_flight": len(self._jobs), "frames_asked": n_frames,
                    "free_output_slots": len(self._free_out), "free_input_slots": len(self._free_in),
                    "slots": self.slots})
            job = _Job(fut, self._free_in.pop(), [self._free_out.pop() for _ in range(n_frames)])
            job_id = next(self._ids)
            self._inp[job.in_slot] = pcm
            self._jobs[job_id] = job
            gen = self._gen
        try:
            self._send(gen, ("submit", job_id, meta, job.in_slot, job.out_slots))
        except Exception:  # meta could not be pickled: nothing reached the core
            self._take([job_id])
            raise
        return fut

    def control(self, method: str, *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            call_id, gen = next(self._ids), self._gen
            self._calls[call_id] = fut
        why = self._down
        try:
            sent = self._send(gen, ("control", call_id, method, args))
        except Exception as exc:  # the arguments could not be pickled
            sent, why = False, f"cannot send {method}: {exc}"
        if not sent:
            with self._lock:
                self._calls.pop(call_id, None)
            _resolve(fut, exc=ProcessingError(why, {"reason": "inference_down"}))
        return fut

    def _send(self, gen: int, msg: tuple) -> bool:
        with self._send_lock:
            if gen != self._gen or self._tx is None:
                return False
            try:
                self._tx.send(msg)
            except (OSError, ValueError):  # the child died; the reader fails the job
                return msg[0] == "submit"
            return True

    def _take(self, job_ids: list[int]) -> list[_Job]:
        with self._lock:
            jobs = [job for job in (self._jobs.pop(i, None) for i in job_ids) if job]
            for job in jobs:
                self._free_in.append(job.in_slot)
                self._free_out.extend(job.out_slots)
        return jobs

    def _on_message(self, msg: tuple) -> None:
        """On the reader thread (process) or the core's thread (ThreadRunner)."""
        if msg[0] == "done":
            _, done, failed = msg
            with self._lock:
                ready = [(j, self._jobs[j]) for j in done if j in self._jobs]
            # copy before the slots are freed; only this thread frees slots while running
            faces = [self._out[job.out_slots] for _, job in ready]
            self._take([j for j, _ in ready])
            for (_, job), f in zip(ready, faces, strict=True):
                _resolve(job.future, f)
            for job_id, message in failed:
                for job in self._take([job_id]):
                    _resolve(job.future, exc=ProcessingError(message, {"job_id": job_id}))
        elif msg[0] == "result":
            _, call_id, ok, value = msg
            with self._lock:
                fut = self._calls.pop(call_id, None)
            if fut is not None:
                _resolve(fut, value) if ok else _resolve(fut, exc=decode_error(value))

    def _fail_pending(self, message: str, details: dict[str, Any]) -> None:
        with self._lock:
            calls, self._calls = list(self._calls.values()), {}
            ids = list(self._jobs)
        for job in self._take(ids):
            _resolve(job.future, exc=ProcessingError(message, details))
        for fut in calls:
            _resolve(fut, exc=ProcessingError(message, details))

    def _go_down(self, reason: str) -> None:
        with self._lock:
            self._accepting, self._down = False, reason
            self._alive_evt.clear()
            self._gen += 1
        with self._send_lock:
            self._tx = None

    def _go_up(self, gen: int) -> None:
        with self._lock:
            if gen == self._gen and not self._closed():
                self._accepting = True
                self._alive_evt.set()

    def _closed(self) -> bool:
        raise NotImplementedError


class _Owned:
    """What must not outlive the server: the child and the shared-memory segments. Kept apart
    from the runner so that atexit and weakref.finalize release it without keeping the runner
    alive; idempotent."""

    def __init__(self, send_lock: threading.Lock) -> None:
        self.closed = threading.Event()
        self.send_lock = send_lock
        self.segments: list[shared_memory.SharedMemory] = []
        self.unlinked = False
        self.child: tuple[Any, Any, Any] | None = None  # process, rx, tx
        self._lock = threading.Lock()

    def take_child(self) -> tuple[Any, Any, Any] | None:
        with self._lock:
            child, self.child = self.child, None
        return child

    def release(self) -> None:
        """Stop the child and unlink the segments. They stay mapped here: numpy views do not
        keep a mapping alive, so unmapping under a view (a reader thread mid-copy) could crash;
        the runner's close() unmaps once its reader has stopped, GC or the exit otherwise."""
        self.closed.set()
        reap(self.take_child(), graceful=True, send_lock=self.send_lock)
        with self._lock:
            segments, self.unlinked = ([] if self.unlinked else self.segments), True
        for shm in segments:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        _LIVE.discard(self)


def reap(child: tuple[Any, Any, Any] | None, graceful: bool = False,
         send_lock: threading.Lock | None = None, timeout: float = 5.0) -> int | None:
    """Stop a child (asking first when ``graceful``), wait for it, kill it if it lingers, close
    its pipes; its exit code."""
    if child is None:
        return None
    proc, rx, tx = child
    if graceful and send_lock is not None and send_lock.acquire(timeout=1.0):
        try:
            tx.send(("stop",))
        except (OSError, ValueError):
            pass
        finally:
            send_lock.release()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join(timeout)
    code = proc.exitcode
    proc.close()
    rx.close()
    tx.close()
    return code


_LIVE: set[_Owned] = set()


@atexit.register
def _release_all() -> None:
    for owned in list(_LIVE):
        owned.release()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class InferenceProcess(_Host):
    """The core in a spawned child; restarts it with back-off after a crash.

    ``on_crash(reason)`` runs on the reader thread after every pending future has failed.
    ``on_restart()`` runs on a helper thread once the new child is up: controls are accepted
    (and queued ahead of any later submit; it may wait on them), submits only after it returns.
    """

    def __init__(self, factory: Callable[[], Core], *, face_shape: tuple[int, ...] = (256, 256, 3),
                 window_samples: int, slots: int = 512,
                 on_crash: Callable[[str], None] | None = None,
                 on_restart: Callable[[], None] | None = None,
                 backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)) -> None:
        super().__init__(factory, face_shape, window_samples, slots)
        self._on_crash_cb, self._on_restart_cb = on_crash, on_restart
        self._backoff = tuple(backoff_s) or (0.0,)
        self._crashes = 0
        self._up_since = 0.0
        self._thread: threading.Thread | None = None
        self._owned = _Owned(self._send_lock)
        tag = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._names = (f"{tag}-in", f"{tag}-out")
        weakref.finalize(self, self._owned.release)

    def _closed(self) -> bool:
        return self._owned.closed.is_set()

    @property
    def pid(self) -> int | None:
        """The current child's process id (None while there is none)."""
        child = self._owned.child
        return child[0].pid if child else None

    def start(self) -> dict[str, Any]:
        if self._owned.segments or self._closed():
            raise RuntimeError("an InferenceProcess starts once")
        _LIVE.add(self._owned)
        try:
            sizes = (self.slots * self.window_samples * 2,
                     self.slots * math.prod(self.face_shape))
            for name, size in zip(self._names, sizes, strict=True):
                self._owned.segments.append(_create_segment(name, size))
            self._inp, self._out = rings(self._owned.segments[0].buf, self._owned.segments[1].buf,
                                          self.slots, self.window_samples, self.face_shape)
            self.info = self._spawn()
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._read_forever, name="inference-reader",
                                        daemon=True)
        self._thread.start()
        self._go_up(self._gen)
        return self.info

    def _spawn(self) -> dict[str, Any]:
        """Start a child on the same segments and wait for its core's info."""
        ctx = multiprocessing.get_context("spawn")
        rx, child_tx = ctx.Pipe(duplex=False)
        child_rx, tx = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child_main, name="avatar-inference", args=(
            self._factory, self._names, self.face_shape, self.window_samples, self.slots,
            child_rx, child_tx))
        with self._owned._lock:
            if self._closed():
                raise ProcessingError("the inference runner is closed")
            proc.start()
            self._owned.child = (proc, rx, tx)
        child_rx.close()
        child_tx.close()  # so that the child's death reads as EOF here
        _widen(tx)
        try:
            msg = rx.recv()
        except (EOFError, OSError):
            msg = ("eof",)
        if msg[0] == "info":
            with self._send_lock:
                self._tx, self._rx = tx, rx
            self._up_since = time.monotonic()
            return msg[1]
        code = reap(self._owned.take_child())
        if msg[0] == "fatal":
            raise decode_error(msg[1])
        raise ProcessingError(f"the inference process stopped while starting: {_exit_reason(code)}",
                              {"reason": _exit_reason(code)})

    def _read_forever(self) -> None:
        while True:
            fatal = None
            while True:
                msgs = pipe_receive(self._rx)(None)
                if msgs is None:
                    break
                for msg in msgs:
                    if msg[0] == "fatal":
                        fatal = decode_error(msg[1]).message
                        continue
                    try:
                        self._on_message(msg)
                    except Exception:
                        log.exception("inference reader: cannot handle %r", msg[0])
            if self._closed():
                return
            self._crashed(fatal)
            if not self._restart():
                return

    def _crashed(self, fatal: str | None) -> None:
        self._go_down("the inference process stopped")
        code = reap(self._owned.take_child())
        reason = f"{fatal} ({_exit_reason(code)})" if fatal else _exit_reason(code)
        log.error("the inference process stopped: %s", reason)
        self._down = f"the inference process is restarting after: {reason}"
        self._fail_pending(f"the inference process stopped: {reason}", {"reason": reason})
        if time.monotonic() - self._up_since >= HEALTHY_S:
            self._crashes = 0
        if self._on_crash_cb is not None:
            try:
                self._on_crash_cb(reason)
            except Exception:
                log.exception("on_crash failed")

    def _restart(self) -> bool:
        """Start a new child after the back-off; False when closed meanwhile."""
        while True:
            delay = self._backoff[min(self._crashes, len(self._backoff) - 1)]
            self._crashes += 1
            if self._owned.closed.wait(delay):
                return False
            try:
                self.info = self._spawn()
                break
            except Exception as exc:
                if self._closed():
                    return False
                log.error("the inference process did not restart: %s", exc)
        self.restarts += 1
        log.warning("the inference process restarted (%d restarts)", self.restarts)
        if self._on_restart_cb is None:
            self._go_up(self._gen)
        else:
            threading.Thread(target=self._after_restart, args=(self._gen,),
                             name="inference-restart", daemon=True).start()
        return True

    def _after_restart(self, gen: int) -> None:
        try:
            self._on_restart_cb()  # type: ignore[misc]
        except Exception:
            log.exception("on_restart failed")
        self._go_up(gen)

    def close(self) -> None:
        """Stop the child, fail what is pending, unlink and unmap the segments. Idempotent."""
        self._go_down("the inference runner is closed")
        self._owned.closed.set()
        self._fail_pending("the inference runner is closed", {"reason": "closed"})
        self._owned.release()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)
        if thread is None or not thread.is_alive():  # nothing reads the rings any more
            self._inp = self._out = np.empty((0,), np.uint8)
            for shm in self._owned.segments:
                shm.close()


def _widen(conn: Any) -> None:
    """Give the pipe to the child 1 MB (Linux; 64 KB by default), so that submits from the event
    loop never block on a child busy in a long step: a full ring of jobs fits."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass


def _create_segment(name: str, size: int) -> shared_memory.SharedMemory:
    """Create a segment and reserve its memory now: a /dev/shm too small for the rings (Docker's
    default is 64 MB) is a clear start-up error here instead of a SIGBUS at the first write."""
    shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    fd = getattr(shm, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            shm.close()
            shm.unlink()
            raise ProcessingError(
                f"cannot reserve {size} bytes of shared memory for the inference process "
                f"({exc.strerror}): give /dev/shm more room (docker --shm-size) or use fewer slots",
                {"needed_bytes": size, "segment": name}, fatal=True) from exc
    return shm


class ThreadRunner(_Host):
    """The same Runner with the core on one thread of this process (tests, MUSETALK_PROCESS=0):
    the same loop, slots and errors, plain arrays instead of shared memory, no restarts."""

    def __init__(self, factory: Callable[[], Core], *, face_shape: tuple[int, ...] = (256, 256, 3),
                 window_samples: int, slots: int = 512) -> None:
        super().__init__(factory, face_shape, window_samples, slots)
        self._inp = np.zeros((slots, window_samples), np.int16)
        self._out = np.zeros((slots, *self.face_shape), np.uint8)
        self._queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._started: Future = Future()
        self._thread: threading.Thread | None = None
        self._is_closed = False

    def _closed(self) -> bool:
        return self._is_closed

    def start(self) -> dict[str, Any]:
        if self._thread is not None:
            raise RuntimeError("a ThreadRunner starts once")
        self._thread = threading.Thread(target=self._run, name="inference-core", daemon=True)
        self._thread.start()
        self.info = self._started.result()
        with self._send_lock:
            self._tx = _QueueTx(self._queue)
        self._go_up(self._gen)
        return self.info

    def _run(self) -> None:
        try:
            core = self._factory()
            self._started.set_result(core.info())
        except Exception as exc:
            self._started.set_exception(decode_error(encode_error(exc)))
            return
        try:
            CoreLoop(core, self._inp, self._out, self._on_message).run(self._receive)
        except Exception as exc:
            log.exception("the inference thread stopped")
            reason = f"{type(exc).__name__}: {exc}"
            self._go_down(f"the inference thread stopped: {reason}")
            self._fail_pending(f"the inference thread stopped: {reason}", {"reason": reason})

    def _receive(self, timeout: float | None) -> list[tuple]:
        try:
            msgs = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(msgs) < _MAX_DRAIN:
            try:
                msgs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return msgs

    def close(self) -> None:
        """Stop the core's thread and fail what is pending. Idempotent."""
        with self._lock:
            self._is_closed = True
        self._go_down("the inference runner is closed")
        self._queue.put(("stop",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10.0)
        self._fail_pending("the inference runner is closed", {"reason": "closed"})


class _QueueTx:
    def __init__(self, q: queue.SimpleQueue) -> None:
        self.send = q.put
