"""The compiled logcumsumexp against torch.logcumsumexp: values, -inf, extremes, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnkit.kernels.cpu import log_scan, threads
from rnnkit.kernels.cpu.log_scan import logcumsumexp

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
SHAPES = [(1,), (1, 5), (2, 3), (37, 2, 33), (300, 8, 32), (4096, 3, 7)]


def random_values(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_logcumsumexp(dtype, shape):
    x = random_values(shape, dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(logcumsumexp(x), torch.logcumsumexp(x, 0), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_negative_infinity_stays_exact_and_never_gives_nan(dtype):
    inf = math.inf
    x = torch.tensor(
        [
            [-inf, -inf, 1.0, -inf],
            [-inf, 2.0, -inf, -inf],
            [-inf, -inf, 3.0, 2.0],
            [0.5, 2.0, -inf, -inf],
        ],
        dtype=dtype,
    )
    y = logcumsumexp(x)
    assert not y.isnan().any()
    assert (y[:3, 0] == -inf).all()
    torch.testing.assert_close(y, torch.logcumsumexp(x, 0), rtol=1e-6, atol=0)
    # Equal entries: log(2 e^v) exactly.
    assert logcumsumexp(torch.tensor([4.0, 4.0], dtype=dtype))[1] == torch.tensor(
        4.0 + math.log(2.0), dtype=dtype
    )


def test_nan_propagates_from_where_it_enters_as_in_torch():
    x = random_values((6, 3), torch.float64)
    x[2, 0] = math.nan
    x[0, 1] = math.nan
    y = logcumsumexp(x)
    assert y[2:, 0].isnan().all() and not y[:2, 0].isnan().any()
    assert y[:, 1].isnan().all() and not y[:, 2].isnan().any()
    torch.testing.assert_close(y, torch.logcumsumexp(x, 0), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_very_large_and_very_small_values(dtype):
    x = random_values((500, 4, 5), dtype, seed=1)
    x[:, 0] *= 1e4  # terms that dwarf each other by e^10000
    x[:, 1] += 80.0  # e^x overflows float32 and below float64 if summed naively
    x[:, 2] -= 1e3 if dtype == torch.float32 else 1e5  # e^x underflows
    x[::7, 3] = -1e30
    y = logcumsumexp(x)
    expected = torch.logcumsumexp(x.double(), 0)
    tol = TOLERANCE[dtype]
    assert y.isfinite().all()
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=0)


def test_gradcheck_on_tiny_sizes():
    x = random_values((6, 2, 3), torch.float64, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(logcumsumexp, (x,))
    # A non-contiguous input too.
    transposed = random_values((3, 5), torch.float64, seed=3).t().requires_grad_(True)
    assert torch.autograd.gradcheck(logcumsumexp, (transposed,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3), (37, 2, 33), (4096, 3, 7)])
def test_backward_matches_torch_autograd(dtype, shape):
    x = random_values(shape, dtype, seed=4).requires_grad_(True)
    upstream = random_values(shape, dtype, seed=5)
    (mine,) = torch.autograd.grad(logcumsumexp(x), x, upstream)
    (theirs,) = torch.autograd.grad(torch.logcumsumexp(x, 0), x, upstream)
    # The gradient sums up to T rounded terms; torch's is the less accurate of the two at
    # T = 4096 (2.5e-12 relative against extended precision, test below).
    tol = (1e-12 if shape[0] < 1000 else 1e-10) if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)


def extended_precision_gradient(x: torch.Tensor, upstream: torch.Tensor) -> np.ndarray:
    """dL/dx of logcumsumexp over dim 0 of (T, N) float64, by the recurrence in long double."""
    values = x.numpy().astype(np.longdouble)
    grad_y = upstream.numpy().astype(np.longdouble)
    y = np.empty_like(values)
    y[0] = values[0]
    for t in range(1, len(values)):
        y[t] = np.logaddexp(y[t - 1], values[t])
    grad_x = np.empty_like(values)
    total = grad_y[-1]
    for s in range(len(values) - 1, -1, -1):
        if s < len(values) - 1:
            total = grad_y[s] + np.exp(y[s] - y[s + 1]) * total
        grad_x[s] = np.exp(values[s] - y[s]) * total
    return grad_x


def test_backward_over_4096_steps_against_extended_precision():
    x = random_values((4096, 21), torch.float64, seed=4).requires_grad_(True)
    upstream = random_values((4096, 21), torch.float64, seed=5)
    (mine,) = torch.autograd.grad(logcumsumexp(x), x, upstream)
    expected = torch.from_numpy(
        extended_precision_gradient(x.detach(), upstream).astype(np.float64)
    )
    torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-12)


def test_backward_with_negative_infinity_gives_zero_where_torch_gives_nan():
    x = random_values((9, 4), torch.float64, seed=6)
    x[:3, 0] = -math.inf  # leading -inf: torch's gradient is NaN there
    x[4, 1] = -math.inf
    x[:, 2] = -math.inf
    x.requires_grad_(True)
    upstream = random_values((9, 4), torch.float64, seed=7)
    (mine,) = torch.autograd.grad(logcumsumexp(x), x, upstream)
    (theirs,) = torch.autograd.grad(torch.logcumsumexp(x, 0), x, upstream)
    assert mine.isfinite().all()
    assert (mine[x.detach() == -math.inf] == 0).all()
    finite = theirs.isfinite()
    assert finite.sum() > 20
    torch.testing.assert_close(mine[finite], theirs[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_column_blocks_cover_every_column_once_aligned(monkeypatch, workers):
    monkeypatch.setattr(threads, "concurrency", lambda: workers)
    for columns, steps in [(1, 10), (16, 10**6), (33, 10**6), (1000, 4096), (128, 4096)]:
        blocks = log_scan._column_blocks(columns, steps)
        assert len(blocks) <= workers
        assert blocks[0][0] == 0 and blocks[-1][1] == columns
        for (_, stop), (start, _) in zip(blocks, blocks[1:]):
            assert stop == start and start % 16 == 0
        assert all(start < stop for start, stop in blocks)


def test_split_across_threads_matches_one_thread(monkeypatch):
    x = random_values((1024, 2, 100), torch.float64, seed=8).requires_grad_(True)
    upstream = random_values((1024, 2, 100), torch.float64, seed=9)
    results = []
    for workers in (1, 3):
        monkeypatch.setattr(threads, "concurrency", lambda workers=workers: workers)
        assert len(log_scan._column_blocks(200, 1024)) == workers
        y = logcumsumexp(x)
        results.append((y, *torch.autograd.grad(y, x, upstream)))
    for one, split in zip(*results, strict=True):
        assert torch.equal(one, split)


def test_no_grad_and_inference_mode_skip_the_autograd_node():
    x = random_values((5, 3), torch.float64).requires_grad_(True)
    with torch.no_grad():
        assert logcumsumexp(x).grad_fn is None
    with torch.inference_mode():
        torch.testing.assert_close(logcumsumexp(x), torch.logcumsumexp(x, 0))


def test_empty_and_negative_dim():
    empty = torch.empty(0, 3)
    assert logcumsumexp(empty).shape == (0, 3)
    x = random_values((4, 2), torch.float64)
    torch.testing.assert_close(logcumsumexp(x, dim=-2), torch.logcumsumexp(x, 0))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: logcumsumexp(torch.randn(3, 2), dim=1), ValueError, "scans dim 0 only"),
        (lambda: logcumsumexp(torch.tensor(1.0)), ValueError, "time dim 0"),
        (lambda: logcumsumexp(torch.ones(3, dtype=torch.int64)), TypeError, "float32/float64"),
        (lambda: logcumsumexp(torch.randn(3).half()), TypeError, "float32/float64"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_warmup_runs():
    log_scan.warmup()
