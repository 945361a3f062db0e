"""float32 tanh and sigmoid that LLVM vectorises, shared by the cells' kernels.

numba's math.tanh and math.exp are scalar libm calls (this llvmlite has no SVML). tanh is the
13/6 rational approximation of Eigen's generic_fast_tanh_float (at most 3.5e-7 absolute error,
measured), and sigmoid(x) = (1 + tanh(x / 2)) / 2. A batch-1 step is bound by these: against the
exponential forms the cells used before, 64 tanh took 65 ns against 156 (the RNN's), and a
GRU's 128 sigmoids and 64 tanh 163 ns against 259 (Xeon, one core, 2026-11-29).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")


@_inline
def tanh_float32(x):
    """tanh of a float32 scalar, in float32."""
    # Past +-7.9053 the fraction would exceed 1 while tanh is 1 to float32 precision. Plain
    # selects (not min/max) and error_model="numpy" (no zero-division check) let LLVM vectorise.
    limit = np.float32(7.90531110763549805)
    x = limit if x > limit else x  # NaN passes through
    x = -limit if x < -limit else x
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@_inline
def sigmoid_float32(x):
    """1 / (1 + e^-x) of a float32 scalar, in float32."""
    half = np.float32(0.5)
    return half + half * tanh_float32(half * x)
