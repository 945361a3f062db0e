"""The kernels' float32 tanh and sigmoid (kernels/cpu/activations.py) against float64 torch."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from rnnkit.kernels.cpu.activations import sigmoid_float32, tanh_float32


@njit
def _tanh_all(values):
    out = np.empty_like(values)
    for i in range(values.size):
        out[i] = tanh_float32(values[i])
    return out


@njit
def _sigmoid_all(values):
    out = np.empty_like(values)
    for i in range(values.size):
        out[i] = sigmoid_float32(values[i])
    return out


def _values() -> np.ndarray:
    """Dense over where the functions bend, logarithmic toward 0 and beyond saturation."""
    small = np.logspace(-30, 2, 4000)
    return np.concatenate([np.linspace(-30, 30, 60001), small, -small, [0.0, 1e30, -1e30]]).astype(
        np.float32
    )


def test_tanh_is_within_its_bound_odd_and_saturates():
    values = _values()
    result = _tanh_all(values)
    assert result.dtype == np.float32
    exact = torch.tanh(torch.from_numpy(values).double()).numpy()
    assert np.abs(result - exact).max() <= 3.5e-7
    assert np.abs(result).max() <= 1.0
    assert np.array_equal(_tanh_all(-values), -result)  # odd, to the bit
    # Near 0 the rational form keeps relative accuracy: tanh x = x to float32 precision.
    tiny = values[np.abs(values) < 1e-4]
    assert np.allclose(_tanh_all(tiny), tiny, rtol=2e-7, atol=0)
    ends = _tanh_all(np.array([np.inf, -np.inf, np.nan], np.float32))
    assert abs(ends[0] - 1) <= 1.2e-7 and abs(ends[1] + 1) <= 1.2e-7 and np.isnan(ends[2])


def test_sigmoid_is_within_its_bound_and_in_the_unit_interval():
    values = _values()
    result = _sigmoid_all(values)
    exact = torch.sigmoid(torch.from_numpy(values).double()).numpy()
    assert np.abs(result - exact).max() <= 2e-7
    assert result.min() >= 0.0 and result.max() <= 1.0
    assert np.isnan(_sigmoid_all(np.array([np.nan], np.float32))[0])
