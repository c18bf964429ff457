"""The core's side of the inference host: the loop that owns a compute core, shared by the
spawned child (``child_main``) and ``process.ThreadRunner``, and the error codec both sides use.

The loop waits for messages until the core's next wake time, hands submits and controls to the
core, steps it, writes each face into its job's output slot and reports finished and failed jobs
in one message per step. It imports no torch; the core it hosts may, in the child.
"""

from __future__ import annotations

import math
import mmap
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ... import errors
from ...errors import ProcessingError, ServiceError
from ...gc_pauses import freeze_startup_objects

MAX_DRAIN = 256  # messages handled before the core steps again


class Core(Protocol):
    """Built in the child by the factory; every method runs on one thread there."""

    def info(self) -> dict[str, Any]: ...
    def control(self, method: str, args: tuple) -> Any: ...
    def submit(self, job_id: int, meta: dict[str, Any], pcm: np.ndarray) -> None: ...
    def step(self, now: float) -> tuple[list[tuple[int, int, np.ndarray]], float]: ...
    def failed(self) -> list[tuple[int, str]]: ...


def encode_error(exc: BaseException) -> tuple[str, str, dict[str, Any], bool]:
    """A picklable form that keeps a ServiceError's class, details and fatality (pickling the
    exception itself would drop its details)."""
    if isinstance(exc, ServiceError):
        return type(exc).__name__, exc.message, dict(exc.details), exc.fatal
    return "", f"{type(exc).__name__}: {exc}", {"exception": type(exc).__name__}, False


def decode_error(err: tuple[str, str, dict[str, Any], bool]) -> ServiceError:
    """The error again: our own class when it is one, else a ProcessingError with the message."""
    name, message, details, fatal = err
    cls = getattr(errors, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, ServiceError)):
        return ProcessingError(message, details)
    exc = cls.__new__(cls)
    ServiceError.__init__(exc, message, details, fatal=fatal)
    return exc


def rings(inp: Any, out: Any, slots: int, window: int,
          face_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The input ring (PCM windows) and output ring (faces) as arrays over two buffers."""
    return (np.ndarray((slots, window), np.int16, buffer=inp),
            np.ndarray((slots, *face_shape), np.uint8, buffer=out))


class CoreLoop:
    """The core's side, shared by the child process and ThreadRunner: wait for messages until
    the core's next wake time, hand them to the core, step it, write faces into their slots and
    report finished and failed jobs in one message per step."""

    def __init__(self, core: Core, inp: np.ndarray, out: np.ndarray,
                 emit: Callable[[tuple], None]) -> None:
        self.core, self.inp, self.out, self.emit = core, inp, out, emit
        self.jobs: dict[int, tuple[list[int], set[int]]] = {}  # job -> out slots, frames to come
        self.failed: list[tuple[int, str]] = []

    def run(self, receive: Callable[[float | None], list[tuple] | None]) -> None:
        try:
            self._run(receive)
        finally:
            close = getattr(self.core, "close", None)  # optional: a core's own threads
            if close is not None:
                close()

    def _run(self, receive: Callable[[float | None], list[tuple] | None]) -> None:
        wake = math.inf
        while True:
            timeout = None if wake == math.inf else max(0.0, wake - time.monotonic())
            msgs = receive(timeout)
            if msgs is None:  # the parent is gone
                return
            for msg in msgs:
                if msg[0] == "stop":
                    return
                self.handle(msg)
            if msgs or time.monotonic() >= wake:
                wake = self.step()

    def handle(self, msg: tuple) -> None:
        if msg[0] == "submit":
            _, job_id, meta, in_slot, out_slots = msg
            self.jobs[job_id] = (out_slots, set(range(len(out_slots))))
            try:
                self.core.submit(job_id, meta, self.inp[in_slot])
            except Exception as exc:  # this job's fault (e.g. an unknown avatar), not the core's
                self._fail(job_id, f"{type(exc).__name__}: {exc}")
        elif msg[0] == "control":
            self.control(*msg[1:])

    def control(self, call_id: int, method: str, args: tuple) -> None:
        try:
            reply: tuple = ("result", call_id, True, self.core.control(method, args))
        except Exception as exc:
            reply = ("result", call_id, False, encode_error(exc))
        try:
            self.emit(reply)
        except OSError:
            raise
        except Exception as exc:  # the result could not be pickled
            self.emit(("result", call_id, False, encode_error(
                ProcessingError(f"the result of {method} cannot be sent back: {exc}"))))

    def step(self) -> float:
        results, wake = self.core.step(time.monotonic())
        done = []
        for job_id, k, face in results:
            entry = self.jobs.get(job_id)
            if entry is None:
                continue  # already failed or finished
            slots, pending = entry
            if not 0 <= k < len(slots) or face.dtype != np.uint8 or face.shape != self.out.shape[1:]:
                self._fail(job_id, f"bad frame {k}: {face.dtype} {face.shape}")
                continue
            self.out[slots[k]] = face
            pending.discard(k)
            if not pending:
                del self.jobs[job_id]
                done.append(job_id)
        for job_id, message in self.core.failed():
            self._fail(job_id, message)
        failed, self.failed = self.failed, []
        if done or failed:
            self.emit(("done", done, failed))
        return wake

    def _fail(self, job_id: int, message: str) -> None:
        if self.jobs.pop(job_id, None) is not None:
            self.failed.append((job_id, message))


def pipe_receive(conn: Any) -> Callable[[float | None], list[tuple] | None]:
    """A receive for ``CoreLoop.run``: wait up to the timeout (None: for ever), then take every
    waiting message (at most MAX_DRAIN); None once the other end is gone."""
    def receive(timeout: float | None) -> list[tuple] | None:
        msgs: list[tuple] = []
        try:
            if conn.poll(timeout):
                msgs.append(conn.recv())
                while len(msgs) < MAX_DRAIN and conn.poll(0):
                    msgs.append(conn.recv())
        except (EOFError, OSError):
            return msgs or None
        return msgs
    return receive


def attach(name: str) -> mmap.mmap:
    """Map a segment the parent created without ``SharedMemory``: on Python < 3.13 attaching
    registers the name with the resource tracker. A spawned child shares the parent's tracker,
    whose books are a set, so that is harmless only while the tracker is the parent's; and
    unregistering after attaching would drop the parent's entry, so that the parent's own
    unlink makes the tracker print a KeyError. Mapping directly leaves the books to the parent."""
    import _posixshmem  # noqa: PLC0415 - POSIX only, child only

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def child_main(factory: Callable[[], Core], names: tuple[str, str], face_shape: tuple[int, ...],
               window: int, slots: int, rx: Any, tx: Any) -> None:
    """The inference process: build the core, report its info, run the loop until told to stop
    or the parent disappears. Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    maps = [attach(n) for n in names]
    inp, out = rings(maps[0], maps[1], slots, window, face_shape)
    try:
        core = factory()
        # the models, the avatars' data and the imports live as long as this process: a full
        # collection over them held the GIL, and so the lane, for ~100 ms
        frozen = freeze_startup_objects()
        tx.send(("info", {**core.info(), "gc_frozen_objects": frozen}))
        CoreLoop(core, inp, out, tx.send).run(pipe_receive(rx))
    except Exception as exc:
        traceback.print_exc()
        sys.stderr.flush()
        try:
            tx.send(("fatal", encode_error(exc)))
        finally:
            os._exit(1)
    # the maps are left to the exit: a core may still hold a view (numpy keeps no mapping alive)
