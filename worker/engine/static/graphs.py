"""Decode buckets, and what runs a decode step of a bucket: the step function itself, or the CUDA
graph captured from it.

A decode step of the static path is a function of two host ints, the rows bucket and the length
bucket (`DecodeFn`): everything else it reads and writes lives in fixed device buffers. So one
CUDA graph per pair of buckets, captured once, replays any step of that shape: the whole forward
pass is one launch instead of hundreds of kernels launched one by one from Python.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

DecodeFn = Callable[[int, int], None]  # (rows bucket, length bucket): logits into the buffer

# The smallest length bucket: short rows share it rather than each size having a graph.
MIN_LENGTH_BUCKET = 128


def batch_buckets(slots: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `slots`, and `slots`."""
    sizes = []
    size = 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return (*sizes, slots)


def length_buckets(columns: int) -> tuple[int, ...]:
    """MIN_LENGTH_BUCKET, twice that, ... below `columns`, and `columns`."""
    sizes = []
    size = MIN_LENGTH_BUCKET
    while size < columns:
        sizes.append(size)
        size *= 2
    return (*sizes, columns)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `n` (buckets ascending)."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket ({buckets[-1]})")


class Runner(Protocol):
    """Runs decode steps of a `DecodeFn`."""

    def prepare(self, shapes: Sequence[tuple[int, int]]) -> None:
        """Whatever the shapes need before serving (capture); raises if that fails."""

    def run(self, rows: int, length: int) -> None: ...


RunnerFactory = Callable[[DecodeFn, torch.device], Runner]


class EagerRunner:
    def __init__(self, fn: DecodeFn) -> None:
        self._fn = fn

    def prepare(self, shapes: Sequence[tuple[int, int]]) -> None:
        for rows, length in shapes:
            self._fn(rows, length)

    def run(self, rows: int, length: int) -> None:
        self._fn(rows, length)


class CudaGraphRunner:
    """One CUDA graph per shape, sharing one memory pool: graphs are captured largest first, so
    the pool is sized by the largest and the others reuse it (they never run at once)."""

    def __init__(self, fn: DecodeFn, device: torch.device) -> None:
        self._fn = fn
        self._device = device
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def prepare(self, shapes: Sequence[tuple[int, int]]) -> None:
        # Warm-up on a side stream first, as capture requires: lazy initialisation (cuBLAS
        # handles, kernel selection, compilation) must not happen inside a capture.
        current = torch.cuda.current_stream(self._device)
        side = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for rows, length in shapes:
                self._fn(rows, length)
        current.wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for rows, length in sorted(shapes, reverse=True):
            graph = torch.cuda.CUDAGraph()
            # Thread-local: another model's engine thread may use the device meanwhile.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._fn(rows, length)
            self._graphs[(rows, length)] = graph
        torch.cuda.synchronize(self._device)

    def run(self, rows: int, length: int) -> None:
        self._graphs[(rows, length)].replay()


def cuda_graph_runner(fn: DecodeFn, device: torch.device) -> Runner:
    return CudaGraphRunner(fn, device)
