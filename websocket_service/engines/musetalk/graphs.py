"""Static graphs per batch bucket for the MuseTalk networks (UNet + decoder).

Why buckets: from Python the UNet is launch-bound (~33 ms at any batch size on an H100, see
``shared/GPU_PATH.md``); a captured CUDA graph or a compiled graph removes the launch cost, but
only for the shapes it was built for. A batch of ``n`` frames is therefore padded up to the next
bucket (1, 2, 4, 8, 16, 32, as vLLM does), run through that bucket's graph, and the padding is
sliced off. Every operation in the UNet and the decoders works on each sample alone (GroupNorm,
per-sample attention, convolutions), so padding rows never change the real rows.

Three modes (:class:`BucketRunner`):

``cuda-graph``
    One ``torch.cuda.CUDAGraph`` per bucket over the eager modules, each with its own static input
    buffers. Warm-up iterations run on a side stream first (PyTorch's documented recipe: lazy
    initialisation, cuDNN/cuBLAS workspace and autotuning must not happen during capture). Buckets
    are captured largest first into one shared memory pool (``torch.cuda.graph_pool_handle``): the
    largest bucket's intermediates are allocated once and the smaller graphs reuse that memory.
    Sharing is safe here because graphs only ever replay one at a time on one stream, and each
    graph's output is copied out before the next replay (a replay overwrites the memory of the
    previous replay's outputs).
``compile``
    One ``torch.compile(..., dynamic=False, fullgraph=True)`` object per bucket. With the default
    ``dynamic=None`` a second shape makes torch switch the function to a dynamic-shape graph,
    which measured slower than the static ones on the H100; ``dynamic=False`` keeps one static
    graph per bucket and ``fullgraph=True`` makes a graph break an error at start-up instead of
    several graphs per bucket. Each bucket gets its own code object so the per-code-object cache
    (``recompile_limit``) and "automatic dynamic" state are never shared between buckets. A
    counting backend wrapper counts compiles per bucket (``compile_counts``) and compiles that saw
    symbolic shapes (``dynamic_counts``); a recompile after warm-up is logged. On CUDA the default
    is inductor's "reduce-overhead" mode (compiled kernels replayed as CUDA graphs).
``eager``
    Pad + slice only: the same shapes as the graph modes, no capture. The reference for tests and
    the mode on CPU.

The engine runs two runners per batch (``decoder.make_unet`` and ``decoder.make_decode``): the UNet
over the whole batch, its latents left on the device (``to_host=False``), then the decoder over
chunks of the batch (:func:`chunk_sizes`), each chunk's faces copied to the host and handed on
as soon as it is decoded. The decoder is ~70 % of a batch's time on the H100 and it costs the same
per frame in chunks (it is compute-bound), so the first chunk's faces come back after the UNet
and one chunk instead of after the whole batch.

Graphs are captured on the thread that calls :meth:`BucketRunner.warm_up`, and :meth:`run` must be
called from that same thread (graphs recorded by ``torch.compile`` must be replayed from the thread
that recorded them); a call from another thread raises instead of failing obscurely.

Outputs reach the host through one pinned buffer with a non-blocking copy and a single CUDA event
wait: no ``torch.cuda.synchronize`` per batch, which would also wait for unrelated work on the
device, and no pageable blocking copy.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
import types
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
GraphMode = Literal["auto", "eager", "compile", "cuda-graph"]
MODES = ("auto", "eager", "compile", "cuda-graph")
CUDA_WARMUP_ITERS = 3  # side-stream iterations before a capture (PyTorch's example uses 3)

Fn = Callable[..., torch.Tensor]
Shape = tuple[int, ...]


def bucket_for(n: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket >= ``n``; ValueError when ``n`` < 1 or above the largest bucket."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"batch size {n} exceeds the largest bucket {max(buckets)}")


def chunk_sizes(n: int, chunk: int) -> list[int]:
    """How a batch of ``n`` frames is decoded: chunks of ``chunk`` frames in order, the last one
    shorter; ``chunk`` 0 (or >= ``n``): one call over the whole batch."""
    if n < 0 or chunk < 0:
        raise ValueError(f"need n >= 0 and chunk >= 0, got n={n}, chunk={chunk}")
    if n == 0:
        return []
    if chunk == 0 or chunk >= n:
        return [n]
    return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto``: CUDA graphs on CUDA, eager elsewhere. CUDA graphs off CUDA is an error."""
    if mode not in MODES:
        raise ValueError(f"unknown graph mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "cuda-graph" if device.type == "cuda" else "eager"
    if mode == "cuda-graph" and device.type != "cuda":
        raise ValueError(f"graph mode 'cuda-graph' needs a CUDA device, not {device}")
    return mode


def _has_symbolic_shape(example_inputs: list[Any]) -> bool:
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return True
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return True
    return False


def _grad_off() -> contextlib.ExitStack:
    """no_grad, and never inference mode, whatever the caller's mode: warm-up and every run see
    the same autograd state (dynamo guards on it: a change would recompile), and tracing under
    inference mode took 3x longer to compile (tiny model, CPU)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _own_code(fn: Fn, bucket: int) -> Fn:
    """A trampoline with its own code object, so dynamo caches each bucket separately."""

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        return fn(*inputs)

    code = call.__code__.replace(co_name=f"musetalk_bucket_{bucket}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


class BucketRunner:
    """Runs ``fn`` on batches padded to fixed buckets, in one of three modes.

    ``fn(x1 [b, *shapes[0]], x2 [b, *shapes[1]], ...) -> tensor [b, ...]`` on the device: the
    UNet (latents and audio tokens -> latents), the decoder (latents -> uint8 images
    [b, H, W, 3]) or both; any dtype works. :meth:`run` returns a numpy array on the host, or
    with ``to_host=False`` a tensor on the device that no later replay overwrites (the UNet's
    latents, which the decoder then reads chunk by chunk). Not thread-safe: one thread calls
    :meth:`warm_up` and then :meth:`run`.

    ``compile_backend`` / ``compile_mode`` choose torch.compile's backend in ``compile`` mode
    (default: inductor, "reduce-overhead" on CUDA); tests on CPU use a cheap backend.

    ``compile_kernels`` (cuda-graph mode only): each bucket's graph captures inductor-compiled
    kernels (one static ``torch.compile`` per bucket, default inductor mode, no cudagraph trees)
    instead of the eager modules. Why: a CUDA graph over eager modules removes the UNet's launch
    cost but not the SD-VAE's compute (135 ms at batch 32 measured, against 49 ms for the compiled
    VAE decoder), and the issue's 400 frames/s at batch 32 needs both. Costs minutes of start-up
    per bucket; measured by ``bench/bench_gpu_path.py``.
    """

    def __init__(self, fn: Fn, shapes: tuple[Shape, ...], device: torch.device,
                 dtype: torch.dtype, mode: GraphMode = "auto",
                 buckets: tuple[int, ...] = BUCKETS, *, compile_backend: str = "inductor",
                 compile_mode: str | None = None, compile_kernels: bool = False,
                 to_host: bool = True) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {buckets}")
        if not shapes:
            raise ValueError("fn needs at least one input shape")
        self.fn = fn
        self.shapes: tuple[Shape, ...] = tuple(tuple(int(d) for d in sh) for sh in shapes)
        self.to_host = to_host
        self.device, self.dtype = torch.device(device), dtype
        self.mode: str = resolve_mode(mode, self.device)
        self.buckets = tuple(sorted(set(buckets)))
        self.max_batch = self.buckets[-1]
        if compile_kernels and self.mode != "cuda-graph":
            raise ValueError("compile_kernels is an option of the 'cuda-graph' mode, not "
                             f"{self.mode!r}")
        self.compile_kernels = compile_kernels
        self.compile_backend = compile_backend
        self.compile_mode = compile_mode if compile_mode is not None else (
            "reduce-overhead" if self.device.type == "cuda" else None)
        self.compile_counts: dict[int, int] = {b: 0 for b in self.buckets}
        self.dynamic_counts: dict[int, int] = {b: 0 for b in self.buckets}
        self.capture_s: dict[int, float] = {}
        self.ready = self.mode == "eager"  # graph modes need warm_up first
        self._thread: int | None = None
        self._inputs = {b: tuple(torch.zeros((b, *sh), device=self.device, dtype=dtype)
                                 for sh in self.shapes)
                        for b in self.buckets}
        self._graphs: dict[int, Any] = {}  # cuda-graph: CUDAGraph; compile: compiled callable
        self._outputs: dict[int, torch.Tensor] = {}  # cuda-graph: each graph's static output
        self._host: torch.Tensor | None = None  # pinned host buffer (CUDA), max_batch rows
        self._event = torch.cuda.Event() if self.device.type == "cuda" else None

    # -- start-up
    def warm_up(self) -> dict[int, float]:
        """Capture / compile every bucket, largest first, on the calling thread (the thread that
        will call :meth:`run`). Returns the seconds each bucket took (also ``.capture_s``).
        Eager mode has nothing to build: 0.0 per bucket."""
        if self.mode == "eager":  # nothing captured: any thread may run it
            self.capture_s = {b: 0.0 for b in self.buckets}
            self.ready = True
            return dict(self.capture_s)
        self._thread = threading.get_ident()
        pool = torch.cuda.graph_pool_handle() if self.mode == "cuda-graph" else None
        with _grad_off():
            for b in reversed(self.buckets):
                t0 = time.perf_counter()
                if self.mode == "cuda-graph":
                    self._capture(b, pool)
                else:
                    self._compile(b)
                self.capture_s[b] = time.perf_counter() - t0
                log.info("MuseTalk bucket %d: %s in %.2f s", b, self.mode, self.capture_s[b])
        self.ready = True
        return dict(sorted(self.capture_s.items()))

    def _capture(self, b: int, pool: Any) -> None:
        inputs = self._inputs[b]
        fn = self.fn
        if self.compile_kernels:  # compiled (and autotuned) by the first warm-up iteration
            fn = torch.compile(_own_code(self.fn, b), dynamic=False, fullgraph=True,
                               backend=self._backend(b, kernels_only=True))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(CUDA_WARMUP_ITERS):
                fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn(*inputs)
        self._check_output(out, b)
        self._graphs[b], self._outputs[b] = graph, out
        if not self.compile_kernels:  # there the backend counted the compile
            self.compile_counts[b] += 1
        graph.replay()  # one replay now: its errors surface at start-up, not on the first batch
        torch.cuda.current_stream(self.device).synchronize()

    def _backend(self, b: int, kernels_only: bool = False) -> Callable[..., Any]:
        if self.compile_backend == "inductor" and hasattr(torch, "_TorchCompileInductorWrapper"):
            # torch.compile(mode=...) only applies to its own inductor wrapper; build the same one
            # so that a counting wrapper can sit in front of it. Kernels captured in our own
            # graph must not record cudagraph trees of their own: inductor's default mode.
            mode = None if kernels_only else self.compile_mode
            inner: Callable[..., Any] = torch._TorchCompileInductorWrapper(mode, None, False)
        else:
            inner = torch._dynamo.lookup_backend(self.compile_backend)

        def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            self.compile_counts[b] += 1
            if _has_symbolic_shape(example_inputs):
                self.dynamic_counts[b] += 1
            if self.ready:
                log.warning("MuseTalk bucket %d recompiled after warm-up (%d compiles)",
                            b, self.compile_counts[b])
            return inner(gm, example_inputs)

        return counting

    def _compile(self, b: int) -> None:
        compiled = torch.compile(_own_code(self.fn, b), dynamic=False, fullgraph=True,
                                 backend=self._backend(b))
        inputs = self._inputs[b]
        # reduce-overhead records its CUDA graph on a later call than the compiling one
        out = None
        for _ in range(CUDA_WARMUP_ITERS if self.device.type == "cuda" else 1):
            out = None  # a previous call's output is invalid once the next one starts
            self._mark_step()
            out = compiled(*inputs)
        self._check_output(out, b)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._graphs[b] = compiled

    def _mark_step(self) -> None:
        if self.mode == "compile" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # each batch is a new inference step

    def _check_output(self, out: Any, b: int) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != b:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"fn must return a tensor with {b} rows for bucket {b}, got {got}")
        if self.device.type == "cuda" and self.to_host and self._host is None:
            self._host = torch.empty((self.max_batch, *out.shape[1:]), dtype=out.dtype,
                                     pin_memory=True)

    # -- per batch
    def run(self, *inputs: torch.Tensor) -> Any:
        """``n`` real rows of each input -> ``n`` outputs: pad to ``bucket_for(n)``, run that
        bucket's graph, slice the padding off; a new numpy array on the host, or (``to_host``
        false) a new tensor on the device."""
        n = self._check_inputs(inputs)
        if not self.ready:
            raise RuntimeError("BucketRunner.warm_up() must run before run() in "
                               f"{self.mode!r} mode")
        if self._thread is not None and threading.get_ident() != self._thread:
            raise RuntimeError("BucketRunner.run() called from a thread other than the one that "
                               "ran warm_up(): graphs replay on the thread that captured them")
        b = bucket_for(n, self.buckets)
        with _grad_off():
            static = self._inputs[b]
            for buf, x in zip(static, inputs, strict=True):
                buf[:n].copy_(x, non_blocking=True)
                if n < b:  # padding: zeros, never a previous batch's rows
                    buf[n:].zero_()
            if self.mode == "cuda-graph":
                self._graphs[b].replay()
                out = self._outputs[b]
            elif self.mode == "compile":
                self._mark_step()
                out = self._graphs[b](*static)
            else:
                out = self.fn(*static)
            if not self.to_host:  # a copy: the next replay (or compiled step) reuses out's memory
                return out[:n].clone()
            return self._to_host(out, n)

    def _check_inputs(self, inputs: tuple[torch.Tensor, ...]) -> int:
        got = [tuple(x.shape) for x in inputs]
        if len(inputs) != len(self.shapes) or any(
                tuple(g[1:]) != sh for g, sh in zip(got, self.shapes, strict=True)):
            want = ", ".join(f"[n, {', '.join(map(str, sh))}]" for sh in self.shapes)
            raise ValueError(f"expected inputs {want}, got {got}")
        n = got[0][0]
        if any(g[0] != n for g in got):
            raise ValueError(f"inputs with different row counts: {[g[0] for g in got]}")
        bucket_for(n, self.buckets)  # ValueError for 0 or more than the largest bucket
        return n

    def _to_host(self, out: torch.Tensor, n: int) -> np.ndarray:
        if out.device.type != "cuda":
            return out[:n].numpy().copy()
        if self._host is None:  # eager mode on CUDA: sized by the first output
            self._check_output(out, out.shape[0])
        assert self._host is not None and self._event is not None
        host = self._host[:n]
        host.copy_(out[:n], non_blocking=True)
        self._event.record()
        self._event.synchronize()  # waits for this batch's copy only, not the whole device
        return host.numpy().copy()

    # -- measurement
    def measure(self, repeats: int = 5, seed: int = 0) -> dict[int, float]:
        """Median seconds of :meth:`run` for a full batch of each bucket (random inputs), after
        one untimed run. On CUDA timed with CUDA events around the whole call (input copies,
        replay, copy-out). For a measured cost model and the GPU benchmark."""
        gen = torch.Generator().manual_seed(seed)
        times: dict[int, float] = {}
        for b in self.buckets:
            xs = tuple(torch.randn((b, *sh), generator=gen).to(self.device, self.dtype)
                       for sh in self.shapes)
            self.run(*xs)
            samples = [self._timed(xs) for _ in range(max(1, repeats))]
            times[b] = statistics.median(samples)
        return times

    def _timed(self, xs: tuple[torch.Tensor, ...]) -> float:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            self.run(*xs)
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.run(*xs)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
