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


def run_concurrently(function: Callable, argument_lists: Sequence[tuple]) -> None:
    """function(*arguments) for each tuple of arguments, at most concurrency() at a time; the
    first exception raised by any call is raised here after all have finished."""
    count = min(len(argument_lists), concurrency())
    if count <= 1:
        for arguments in argument_lists:
            function(*arguments)
        return
    errors: list[BaseException] = []

    def body(_data) -> None:
        # Thread i of the team takes calls i, i + n, ...; if the runtime grants fewer threads
        # than asked for, the ones it grants take the rest.
        team = _runtime.omp_get_num_threads()
        for index in range(_runtime.omp_get_thread_num(), len(argument_lists), team):
            try:
                function(*argument_lists[index])
            except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(error)

    callback = _BODY(body)  # kept referenced until GOMP_parallel returns
    _runtime.GOMP_parallel(ctypes.cast(callback, ctypes.c_void_p), None, count, 0)
    if errors:
        raise errors[0]


def batch_parts(batch: int, step_work: int, min_rows: int, min_step_work: int) -> list[slice]:
    """Slices of the batch whose time loops run concurrently: one per thread, each with at least
    min_rows rows and min_step_work multiply-adds of the per-step product (step_work in all)."""
    min_rows, min_step_work = max(1, min_rows), max(1, min_step_work)
    if batch < 2 * min_rows or step_work < 2 * min_step_work:
        return [slice(0, batch)]  # too small to split at any thread count (the usual batch 1)
    parts = min(concurrency(), batch // min_rows, step_work // min_step_work)
    if parts < 2:
        return [slice(0, batch)]
    bounds = [round(batch * index / parts) for index in range(parts + 1)]
    return [slice(bounds[index], bounds[index + 1]) for index in range(parts)]
