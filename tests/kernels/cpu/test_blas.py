"""The kernels' matrix products against numpy, and the kernels on each BLAS fallback."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

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


def _product_operands(seed: int, rows: int, trans_b: bool, dtype) -> tuple:
    """A (64, 96) weight (stored (96, 64) where read transposed), (rows, 64) rows to multiply by
    it, and their workspace."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((96, 64) if trans_b else (64, 96)).astype(dtype)
    a = rng.standard_normal((rows, 64)).astype(dtype)
    return weight, a, blas.workspace(a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("rows", [1, 32])
def test_prepared_weight_products_match_numpy(rows, trans_b, dtype):
    # Batch 1 takes the panels (float32 with AVX-512) or loops with a transposed copy; batch 32
    # takes MKL's packed form (float32).
    weight, a, work = _product_operands(2, rows, trans_b, dtype)
    prepared, transposed, packed = blas.prepare_weight(rows, weight, trans_b, True, work)
    c = np.ones((rows, 96), dtype)
    blas.gemm_weight(a, prepared, transposed, packed, c, True, work)
    expected = a @ (weight.T if trans_b else weight) + 1
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(c, expected, rtol=tolerance, atol=tolerance)
    if rows == 32 and dtype == np.float32:
        assert (packed.size > 0) == blas.PACKED_GEMM


@pytest.mark.skipif(not blas.LIBRARY.startswith("MKL"), reason="MKL's packed form needs MKL")
@pytest.mark.parametrize("trans_b", [False, True])
def test_mkl_packed_form_serves_fewer_rows_than_packed_for(trans_b):
    # A weight packed for a chunk of rows also serves a last, shorter chunk and a batch part.
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((256, 48) if trans_b else (48, 256)).astype(np.float32)
    work = blas.workspace(weight)
    packed = blas._mkl_pack(32, weight, trans_b, work)
    assert packed.size % blas.panels.PANEL == 1  # how gemm_weight tells it from the panels
    for rows in (32, 13, 8, 1):
        a = rng.standard_normal((rows, 48)).astype(np.float32)
        c = np.ones((rows, 256), np.float32)
        blas.gemm_weight(a, weight, trans_b, packed, c, True, work)
        expected = a @ (weight.T if trans_b else weight) + 1
        np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not blas.PANELS, reason="the panels need AVX-512")
def test_prepare_weight_takes_the_packed_form_chosen_for_the_rows():
    rng = np.random.default_rng(4)
    large = rng.standard_normal((blas.MKL_PACK_MIN_WEIGHT // 128, 128)).astype(np.float32)
    small = large[:-1]
    work = blas.workspace(large)
    for weight in (large, small):
        for rows in (1, blas.MKL_PACK_MIN_ROWS - 1, blas.MKL_PACK_MIN_ROWS, 64):
            packed = blas.prepare_weight(rows, weight, True, True, work)[2]
            wide = rows >= blas.MKL_PACK_MIN_ROWS and weight.size >= blas.MKL_PACK_MIN_WEIGHT
            mkl_form = blas.MKL_PACKS_WIDE and wide
            assert packed.size % blas.panels.PANEL == (1 if mkl_form else 0), (rows, weight.shape)


@pytest.mark.skipif(not blas.PANELS, reason="the panels need AVX-512")
@pytest.mark.parametrize("trans_b", [False, True])
def test_small_products_take_the_panels_without_packing_asked_for(trans_b):
    # Few steps (use_packing False): a product small enough for plain loops is packed into
    # panels instead of copied transposed; a larger one goes to BLAS as it is.
    rng = np.random.default_rng(5)
    shape = (256, 64) if trans_b else (64, 256)
    weight = rng.standard_normal(shape).astype(np.float32)
    work = blas.workspace(weight)
    for rows in (1, blas.SMALL_GEMM // weight.size, blas.SMALL_GEMM // weight.size + 1):
        prepared, transposed, packed = blas.prepare_weight(rows, weight, trans_b, False, work)
        small = rows * weight.size <= blas.SMALL_GEMM
        assert packed.size == (blas.panels.packed_size(weight, trans_b) if small else 0), rows
        a = rng.standard_normal((rows, 64)).astype(np.float32)
        c = np.ones((rows, 256), np.float32)
        blas.gemm_weight(a, prepared, transposed, packed, c, True, work)
        expected = a @ (weight.T if trans_b else weight) + 1
        np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("rows", [1, 32])
def test_weight_prepared_into_kept_space_is_packed_there_and_multiplies_alike(rows, trans_b, dtype):
    # Space left dirty by an earlier call (NaN), large enough: the packed form is written into
    # its front, padding included, and the products match those of a fresh pack.
    weight, a, work = _product_operands(5, rows, trans_b, dtype)
    size = blas.packed_size(rows, weight, trans_b, True)
    fresh = blas.prepare_weight(rows, weight, trans_b, True, work)
    assert fresh[2].size == size
    space = np.full(size + 7, np.nan, dtype)
    prepared, transposed, packed = blas.prepare_weight_into(
        rows, weight, trans_b, True, work, space
    )
    assert packed.size == size
    if size:
        assert np.shares_memory(packed, space)
    c, expected = np.ones((rows, 96), dtype), np.ones((rows, 96), dtype)
    blas.gemm_weight(a, prepared, transposed, packed, c, True, work)
    blas.gemm_weight(a, *fresh, expected, True, work)
    np.testing.assert_array_equal(c, expected)
    # Space too small: a new array, and the space is left alone.
    small = np.full(max(size - 1, 0), np.nan, dtype)
    packed = blas.prepare_weight_into(rows, weight, trans_b, True, work, small)[2]
    assert packed.size == size and not np.shares_memory(packed, small)
    assert np.isnan(small).all()


def test_packed_form_choice_follows_the_environment_and_the_cpu(monkeypatch):
    monkeypatch.setattr(blas, "PANELS", True)
    monkeypatch.setattr(blas, "LIBRARY", "MKL (torch)")
    assert blas._choose_mkl_packs_wide("mkl") and not blas._choose_mkl_packs_wide("panels")
    for vendor, expected in (("GenuineIntel", True), ("AuthenticAMD", False), ("", False)):
        monkeypatch.setattr(blas, "_cpu_vendor", lambda vendor=vendor: vendor)
        assert blas._choose_mkl_packs_wide("auto") == expected, vendor
    monkeypatch.setattr(blas, "PANELS", False)  # no AVX-512: MKL's form is the only one anyway
    assert not blas._choose_mkl_packs_wide("mkl")
    with pytest.raises(ValueError, match="RNNKIT_CPU_PACKED_FORM must be one of"):
        blas._choose_mkl_packs_wide("blocks")
    monkeypatch.setattr(blas, "LIBRARY", "OpenBLAS (numpy)")
    with pytest.raises(ValueError, match="RNNKIT_CPU_PACKED_FORM=mkl needs MKL"):
        blas._choose_mkl_packs_wide("mkl")
    assert not blas._choose_mkl_packs_wide("auto")


def test_threaded_packed_product_needs_mkls_form_float32_and_the_sizes(monkeypatch):
    rows, weight = blas.MKL_PACK_MIN_ROWS, blas.MKL_PACK_MIN_WEIGHT
    monkeypatch.setattr(blas, "MKL_PACKS_WIDE", True)
    assert blas.threaded_packed_product(rows, weight, torch.float32)
    assert not blas.threaded_packed_product(rows - 1, weight, torch.float32)
    assert not blas.threaded_packed_product(rows, weight - 1, torch.float32)
    assert not blas.threaded_packed_product(rows, weight, torch.float64)
    monkeypatch.setattr(blas, "MKL_PACKS_WIDE", False)
    assert not blas.threaded_packed_product(rows, weight, torch.float32)


def _run(script: str, **environment: str) -> list[str]:
    """The words a fresh Python process running `script` printed, with `environment` set."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, **environment),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


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
    printed = _run(_FALLBACK_SCRIPT, RNNKIT_CPU_BLAS=choice, OPENBLAS_NUM_THREADS="1")
    assert printed == [*library.split(), "agree"]


_PACKED_FORM_SCRIPT = textwrap.dedent(
    """
    import torch
    import rnnkit
    from rnnkit.kernels.cpu import blas

    print(blas.MKL_PACKS_WIDE)
    torch.manual_seed(0)
    regularised = {"recurrent_dropout": 0.2, "zoneout": 0.1}
    layers = (
        (rnnkit.LSTM, {"proj_size": 176}), (rnnkit.LSTM, regularised), (rnnkit.GRU, {}),
        (rnnkit.GRU, regularised), (rnnkit.RNN, {}), (rnnkit.LayerNormLSTM, {}),
        (rnnkit.LayerNormGRU, {}), (rnnkit.MinGRU, {}),
    )
    for cls, kwargs in layers:
        reference = cls(192, 192, bidirectional=True, backend="reference", **kwargs)
        fused = cls(192, 192, bidirectional=True, backend="cpu", **kwargs)
        fused.load_state_dict(reference.state_dict())
        # 10 steps and parts of 10 sequences: weights packed, products of 8 rows or more, every
        # weight of MKL_PACK_MIN_WEIGHT elements or more.
        x = torch.randn(10, 20, 192)
        results = []
        for layer in (reference, fused):
            inputs = x.clone().requires_grad_()
            torch.manual_seed(1)  # the same dropout and zoneout masks on both paths
            output, _ = layer(inputs)
            (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
            results.append([output, inputs.grad, *(p.grad for p in layer.parameters())])
        for mine, theirs in zip(results[1], results[0]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    print("agree")
    """
)


@pytest.mark.skipif(
    not (blas.PANELS and blas.LIBRARY.startswith("MKL")), reason="a choice only with both forms"
)
@pytest.mark.parametrize("form", ["mkl", "panels"])
def test_kernels_match_reference_with_either_packed_form(form):
    # Each form forced in turn: the one this CPU does not pick by default is tested here too.
    printed = _run(_PACKED_FORM_SCRIPT, RNNKIT_CPU_PACKED_FORM=form)
    assert printed == [str(form == "mkl"), "agree"]


def test_unknown_blas_choice_is_rejected():
    with pytest.raises(ValueError, match="RNNKIT_CPU_BLAS must be one of"):
        blas._find_blas("atlas")
