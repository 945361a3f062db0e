"""The kernels' matrix products against numpy, and the kernels on each BLAS fallback."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rnnkit.kernels.cpu import blas

# (M, K, N): plain compiled loops, then sizes that go to the BLAS library.
SHAPES = [(3, 4, 5), (40, 50, 60), (1, 200, 300)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_matches_numpy_for_every_transpose_and_accumulate(shape, dtype):
    m, k, n = shape
    rng = np.random.default_rng(0)
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    for trans_a, trans_b, accumulate in itertools.product((False, True), repeat=3):
        a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
        before = rng.standard_normal((m, n)).astype(dtype)
        c = before.copy()
        blas.gemm(a, b, c, trans_a, trans_b, accumulate, blas.workspace(c))
        expected = (a.T if trans_a else a) @ (b.T if trans_b else b) + (before if accumulate else 0)
        np.testing.assert_allclose(c, expected, rtol=tolerance, atol=tolerance * k)


def test_gemm_reads_row_blocks_of_larger_arrays():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 70))
    b = rng.standard_normal((80, 60))
    c = np.zeros((45, 60))
    blas.gemm(a[2:47, 5:45], b[10:50], c, False, False, False, blas.workspace(c))
    np.testing.assert_allclose(c, a[2:47, 5:45] @ b[10:50], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("rows", [1, 32])
def test_prepared_weight_products_match_numpy(rows, trans_b, dtype):
    # Batch 1 takes the loops with a transposed copy; batch 32 takes MKL's packed form (float32).
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((96, 64) if trans_b else (64, 96)).astype(dtype)
    a = rng.standard_normal((rows, 64)).astype(dtype)
    work = blas.workspace(a)
    prepared, transposed, packed = blas.prepare_weight(rows, weight, trans_b, True, work)
    c = np.ones((rows, 96), dtype)
    blas.gemm_weight(a, prepared, transposed, packed, c, True, work)
    expected = a @ (weight.T if trans_b else weight) + 1
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(c, expected, rtol=tolerance, atol=tolerance)
    if rows == 32 and dtype == np.float32:
        assert (packed.size > 0) == blas.PACKED_GEMM


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import torch
    import rnnkit
    from rnnkit.kernels.cpu import blas

    print(blas.LIBRARY)
    torch.manual_seed(0)
    for cls, kwargs in ((rnnkit.LSTM, {"proj_size": 24}), (rnnkit.GRU, {}), (rnnkit.RNN, {})):
        for dtype in (torch.float32, torch.float64):
            reference = cls(20, 64, bidirectional=True, dtype=dtype, backend="reference", **kwargs)
            fused = cls(20, 64, bidirectional=True, dtype=dtype, backend="cpu", **kwargs)
            fused.load_state_dict(reference.state_dict())
            x = torch.randn(6, 9, 20, dtype=dtype)  # batch 9, hidden 64: BLAS-sized products
            results = []
            for layer in (reference, fused):
                inputs = x.clone().requires_grad_()
                output, _ = layer(inputs)
                (output * torch.linspace(-1, 1, output.numel(), dtype=dtype).view_as(output)
                 ).sum().backward()
                results.append([output, inputs.grad, *(p.grad for p in layer.parameters())])
                layer.zero_grad()
            # float32 sums over the rows in another order than autograd's: about 2e-5 apart.
            tolerance = 1e-4 if dtype == torch.float32 else 1e-9
            for mine, theirs in zip(results[1], results[0]):
                torch.testing.assert_close(mine, theirs, rtol=tolerance, atol=tolerance)
    print("agree")
    """
)


@pytest.mark.parametrize(
    ("choice", "library"), [("openblas", "OpenBLAS (numpy)"), ("loops", "compiled loops")]
)
def test_kernels_match_reference_without_mkl(choice, library):
    # The fallbacks for machines whose torch has no MKL: numpy's OpenBLAS, or compiled loops.
    environment = dict(os.environ, RNNKIT_CPU_BLAS=choice, OPENBLAS_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [*library.split(), "agree"]


def test_unknown_blas_choice_is_rejected():
    with pytest.raises(ValueError, match="RNNKIT_CPU_BLAS must be one of"):
        blas._find_blas("atlas")
