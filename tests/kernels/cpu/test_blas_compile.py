"""Compile cost of the matrix products: constant flags from kernels share one compiled body."""

from __future__ import annotations

import numpy as np
from numba import njit, types

from rnnkit.kernels.cpu import blas


@njit
def _products_with_constant_flags(a, b, c, work):
    blas.gemm(a, b, c, False, True, False, work)
    blas.gemm(a, b, c, False, True, True, work)
    blas.gemm(a, b.T.copy(), c, False, False, False, work)
    weight, transposed, packed = blas.prepare_weight(a.shape[0], b, True, False, work)
    blas.gemm_weight(a, weight, transposed, packed, c, False, work)
    blas.gemm_weight(a, weight, transposed, packed, c, True, work)


@njit
def _copies(matrix, target):
    blas.copy_matrix(matrix, target)
    blas.copy_vector(matrix[1], target[0])


def _literal_arguments(dispatcher) -> list:
    return [
        argument
        for signature in dispatcher.signatures
        for argument in signature
        if isinstance(argument, types.Literal)
    ]


def test_constant_flags_compile_one_product_per_array_type():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal((5, 6)).astype(np.float32)
    c = np.zeros((4, 5), np.float32)
    _products_with_constant_flags(a, b, c, blas.workspace(c))
    np.testing.assert_allclose(c, 2 * a @ b.T, rtol=1e-5, atol=1e-5)
    for dispatcher in (blas._gemm, blas._gemm_weight, blas._prepare_weight):
        assert _literal_arguments(dispatcher) == [], dispatcher.py_func.__name__
    c_arrays = types.Array(types.float32, 2, "C")
    float32_c_products = [
        signature for signature in blas._gemm.signatures if signature[:3] == (c_arrays,) * 3
    ]
    assert len(float32_c_products) == 1


def test_copies_match_slice_assignment():
    matrix = np.arange(12.0).reshape(3, 4)
    target = np.zeros((3, 4))
    _copies(matrix, target)
    expected = matrix.copy()
    expected[0] = matrix[1]
    np.testing.assert_array_equal(target, expected)
