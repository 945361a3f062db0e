"""Concurrent kernel calls on torch's OpenMP team."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch
from numba import njit

import rnnkit
from rnnkit.kernels.cpu import threads


@njit(nogil=True, cache=True)
def _fill(target, value):
    for i in range(target.shape[0]):
        target[i] = value


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("calls", [1, 2, 5])
def test_every_call_runs_once(two_threads, calls):
    targets = [np.zeros(1000) for _ in range(calls)]
    threads.run_concurrently(_fill, [(target, index + 1.0) for index, target in enumerate(targets)])
    for index, target in enumerate(targets):
        assert (target == index + 1.0).all()


@pytest.mark.skipif(not threads.AVAILABLE, reason="torch's OpenMP runtime is not GNU libgomp")
def test_calls_run_on_two_threads(two_threads):
    seen = set()

    def record(_):
        seen.add(threading.get_ident())

    threads.run_concurrently(record, [(0,), (1,)])
    assert len(seen) == 2


def test_an_exception_in_a_call_is_raised_after_all_ran(two_threads):
    ran = []

    def call(index):
        ran.append(index)
        if index == 0:
            raise ValueError("call 0 failed")

    with pytest.raises(ValueError, match="call 0 failed"):
        threads.run_concurrently(call, [(0,), (1,), (2,)])
    assert sorted(ran) == [0, 1, 2]


def test_batch_parts_cover_the_batch_and_respect_the_minimums(two_threads):
    split = 2 if threads.AVAILABLE else 1
    parts = threads.batch_parts(9, 9 * 100, min_rows=2, min_step_work=100)
    assert len(parts) == split
    assert [i for part in parts for i in range(part.start, part.stop)] == list(range(9))
    assert len(threads.batch_parts(9, 9 * 100, min_rows=5, min_step_work=100)) == 1
    assert len(threads.batch_parts(9, 150, min_rows=1, min_step_work=100)) == 1
    # A recurrent kernel's batch of few steps stays whole; from MIN_STEPS steps on it splits.
    few, enough = threads.MIN_STEPS - 1, threads.MIN_STEPS
    assert len(threads.batch_parts(9, 9 * 100, 2, 100, steps=few)) == 1
    assert len(threads.batch_parts(9, 9 * 100, 2, 100, steps=enough)) == split
    assert len(threads.batch_parts(9, 9 * 100, 2, 100, steps=3, min_steps=3)) == split
    torch.set_num_threads(1)
    assert len(threads.batch_parts(9, 9 * 100, min_rows=1, min_step_work=1)) == 1


def test_batch_parts_keep_a_batch_whole_where_its_product_runs_on_mkl_threads(two_threads):
    split = 2 if threads.AVAILABLE else 1
    # Few steps stay whole whatever min_steps the kernel asks for.
    few = threads.MIN_STEPS - 1
    assert len(threads.batch_parts(16, 16 * 100, 2, 100, few, min_steps=3)) == split
    assert len(threads.batch_parts(16, 16 * 100, 2, 100, few, 3, threaded_product=True)) == 1
    # A weight larger than THREADED_LARGE_WEIGHT splits only into parts of
    # THREADED_LARGE_MIN_ROWS rows or more.
    rows = threads.THREADED_LARGE_MIN_ROWS
    large, small = threads.THREADED_LARGE_WEIGHT + 1, threads.THREADED_LARGE_WEIGHT
    for batch, weight, threaded, expected in (
        (2 * rows - 1, large, True, 1),
        (2 * rows, large, True, split),
        (2 * rows - 1, large, False, split),
        (16, small, True, split),
    ):
        parts = threads.batch_parts(batch, batch * weight, 4, 100, 50, threaded_product=threaded)
        assert len(parts) == expected, (batch, weight, threaded)


def test_several_python_threads_may_run_concurrent_calls_at_once(two_threads):
    # Each calling thread becomes the master of its own OpenMP team; none may block another.
    results = {}

    def caller(name):
        targets = [np.zeros(10_000) for _ in range(2)]
        for round_ in range(20):
            threads.run_concurrently(_fill, [(t, round_ + i) for i, t in enumerate(targets)])
        results[name] = [target[0] for target in targets]

    callers = [threading.Thread(target=caller, args=(name,)) for name in range(3)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in callers)
    assert results == {name: [19.0, 20.0] for name in range(3)}


@pytest.fixture
def no_automatic_collection():
    """The garbage collector off, so that only reference counting frees what a test drops."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if enabled:
        gc.enable()


def test_the_arguments_are_released_when_the_call_returns(two_threads, no_automatic_collection):
    # A ctypes callback made per call sits in a reference cycle, and held every part's arrays
    # until the collector's next pass (hundreds of MiB over a training loop).
    warm = np.zeros(1000)
    threads.run_concurrently(_fill, [(warm[:500], 1.0), (warm[500:], 2.0)])
    # Garbage that the first team call turns loose (left by an earlier test's torch.compile when
    # tests run in another order) is not this call's.
    gc.collect()
    target = np.zeros(1000)
    released = weakref.ref(target)
    threads.run_concurrently(_fill, [(target[:500], 1.0), (target[500:], 2.0)])
    del target
    assert released() is None
    assert gc.collect() == 0


LAYERS = {
    "LSTM": lambda: rnnkit.LSTM(16, 64, batch_first=True, bidirectional=True),
    "GRU": lambda: rnnkit.GRU(16, 64, batch_first=True),
    "RNN": lambda: rnnkit.RNN(16, 64, batch_first=True),
    "LSTM with zoneout": lambda: rnnkit.LSTM(16, 64, batch_first=True, zoneout=0.1),
    "LayerNormLSTM": lambda: rnnkit.LayerNormLSTM(16, 64, batch_first=True),
    "MinGRU": lambda: rnnkit.MinGRU(16, 64, batch_first=True),
}


@pytest.mark.skipif(not threads.AVAILABLE, reason="torch's OpenMP runtime is not GNU libgomp")
@pytest.mark.parametrize("make_layer", LAYERS.values(), ids=LAYERS.keys())
def test_a_training_step_split_into_parts_leaves_no_reference_cycles(
    two_threads, no_automatic_collection, make_layer
):
    layer = make_layer()
    x = torch.randn(64, 20, 16, requires_grad=True)

    def inference_and_training_step():
        with torch.inference_mode():
            layer(x)
        layer(x)[0].sum().backward()

    inference_and_training_step()  # compiles (numba's compiler leaves cycles of its own)
    gc.collect()
    inference_and_training_step()
    inference_and_training_step()
    assert gc.collect() == 0
