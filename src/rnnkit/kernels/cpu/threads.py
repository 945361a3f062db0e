"""Running independent kernel calls concurrently on torch's own OpenMP threads.

Sequences of a batch (and the two directions of a layer) are independent, so their compiled time
loops can run at the same time, each with single-threaded BLAS. They run on torch's OpenMP team,
entered through the runtime's GOMP_parallel with a ctypes callback (which takes the GIL only to
start each numba call; the calls release it): after any torch op, torch's idle OpenMP workers spin
for milliseconds waiting for the next parallel region, so threads of our own would compete with
them for the cores (measured on 2 cores: two 2.5 ms loops on a Python thread pool took 5 ms right
after a torch op, 2.7 ms on torch's team). Inside the region MKL, linked to the same runtime, runs
single-threaded by its own rule for nested parallelism.

Where torch's OpenMP runtime is not GNU libgomp (no such library beside libtorch), the calls run
one after the other and `batch_parts` never splits.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Callable, Sequence

import torch

_LIBGOMP = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _load_runtime():
    if not os.path.exists(_LIBGOMP):
        return None
    try:
        library = ctypes.CDLL(_LIBGOMP)
        library.GOMP_parallel.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint
        ]  # fmt: skip
        library.GOMP_parallel.restype = None
        library.omp_get_thread_num.restype = ctypes.c_int
        library.omp_get_num_threads.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return library


_runtime = _load_runtime()
AVAILABLE = _runtime is not None


def concurrency() -> int:
    """How many calls run_concurrently can run at once: torch's thread count, or 1."""
    return torch.get_num_threads() if AVAILABLE else 1


# The calls of each run_concurrently, by a key that GOMP_parallel hands to every thread of the
# team as its data pointer. One ctypes callback serves every call: a callback made per call sits
# in a reference cycle of ctypes' own (the function pointer and its thunk), so whatever its
# closure held (every part's arrays) stayed alive until the garbage collector's next pass, which
# in a training loop at (16, 1000, 32, 128) meant hundreds of MiB of past steps' buffers.
_jobs: dict[int, tuple[Callable, Sequence[tuple], list[BaseException]]] = {}
_job_keys = itertools.count(1)  # never 0: ctypes hands a null data pointer over as None


def _run_team_share(key: int) -> None:
    """The body of the parallel region, on each thread of the team: thread i of n runs calls
    i, i + n, ... of the job (if the runtime grants fewer threads than asked for, the ones it
    grants take the rest), collecting their exceptions."""
    function, argument_lists, errors = _jobs[key]
    team = _runtime.omp_get_num_threads()
    for index in range(_runtime.omp_get_thread_num(), len(argument_lists), team):
        try:
            function(*argument_lists[index])
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(error)


_TEAM_SHARE = _BODY(_run_team_share)
_TEAM_SHARE_ADDRESS = ctypes.cast(_TEAM_SHARE, ctypes.c_void_p)


def run_concurrently(function: Callable, argument_lists: Sequence[tuple]) -> None:
    """function(*arguments) for each tuple of arguments, at most concurrency() at a time; the
    first exception raised by any call is raised here after all have finished."""
    count = min(len(argument_lists), concurrency())
    if count <= 1:
        for arguments in argument_lists:
            function(*arguments)
        return
    errors: list[BaseException] = []
    key = next(_job_keys)
    _jobs[key] = (function, argument_lists, errors)
    try:
        _runtime.GOMP_parallel(_TEAM_SHARE_ADDRESS, key, count, 0)
    finally:
        del _jobs[key]
    if errors:
        raise errors[0]


# By default a recurrent kernel's batch of fewer steps than this runs as one part. Its per-step
# products are then MKL's on all of torch's threads (the kernels pack weights for rnnkit's
# single-threaded panels from 8 steps on), and each part's own weight-gradient buffers and their
# sum cost more than the split saves: a GRU's or RNN's training step of one part against two at
# B = 32-64, H = 128-512 took 1.2-2.3x less time at T = 1, 0.9-1.55x at T = 2-6, more from T = 8.
MIN_STEPS = 8
# Where the whole batch's per-step product already runs on MKL's threads (MKL's packed form on
# Intel CPUs, blas.threaded_packed_product), one part beat the split on short calls and on
# weights larger than a core's L2 cache: each part's product then reads the whole weight on its
# thread, where MKL's threads each read their share of its columns. Measured on the Xeon (2 MiB
# L2 a core; 2026-11-29), one part's time over two parts', float32, median of 9 in turns:
# LSTM at T = 4, B = 8-16, H = 128-512: 0.68-0.99; LSTM and GRU with H = 512 (weights of 4 and
# 3 MiB), B = 8: 0.50-0.76 for T >= 12, B = 16: 0.68-0.99, B = 32: 0.79-1.05, B = 64 (parts of
# 32 rows): 0.88-1.29, so parts of fewer than THREADED_LARGE_MIN_ROWS rows are not made there.
THREADED_LARGE_WEIGHT = 1 << 19  # elements: 2 MiB of float32
THREADED_LARGE_MIN_ROWS = 32


def batch_parts(
    batch: int,
    step_work: int,
    min_rows: int,
    min_step_work: int,
    steps: int | None = None,
    min_steps: int = MIN_STEPS,
    threaded_product: bool = False,
) -> list[slice]:
    """Slices of the batch whose time loops run concurrently: one per thread, each with at least
    min_rows rows and min_step_work multiply-adds of the per-step product (step_work in all);
    a recurrent kernel's batch of fewer than min_steps steps is not split. threaded_product:
    the whole batch's product runs on MKL's threads (see THREADED_LARGE_WEIGHT)."""
    if threaded_product:
        min_steps = max(min_steps, MIN_STEPS)
        if batch and step_work // batch > THREADED_LARGE_WEIGHT:
            min_rows = max(min_rows, THREADED_LARGE_MIN_ROWS)
    min_rows, min_step_work = max(1, min_rows), max(1, min_step_work)
    if steps is not None and steps < min_steps:
        return [slice(0, batch)]
    if batch < 2 * min_rows or step_work < 2 * min_step_work:
        return [slice(0, batch)]  # too small to split at any thread count (the usual batch 1)
    parts = min(concurrency(), batch // min_rows, step_work // min_step_work)
    if parts < 2:
        return [slice(0, batch)]
    bounds = [round(batch * index / parts) for index in range(parts + 1)]
    return [slice(bounds[index], bounds[index + 1]) for index in range(parts)]
