"""rnnkit's packed-weight float32 product (AVX-512 register tiles) against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

from rnnkit.kernels.cpu import blas, panels

pytestmark = pytest.mark.skipif(
    not panels.AVAILABLE, reason="the panel product is compiled only for CPUs with AVX-512"
)

SHAPES = [
    (1, 1, 1),  # one element: a tail tile of one row, a partial panel of one column
    (7, 3, 33),  # one full tile + a tail row; one full panel + one column
    (6, 256, 64),  # exact tiles, panels and one K block
    (13, 300, 100),  # K past one block, partial last panel
    (32, 128, 512),  # an LSTM step at B = 32, H = 128
    (5, 513, 31),  # K one past two blocks, narrower than a panel
    (1, 300, 264),  # one row: two groups of four panels, K past one block, a partial panel
    (1, 64, 200),  # one row: one group of four panels, two single panels, a partial panel
    (1, 64, 64),  # one row, two panels: K in two partial sums
    (1, 7, 32),  # one row, one panel: K split in four with three steps left over
    (1, 3, 96),  # one row, three panels: K shorter than its split
    (1, 261, 224),  # one row: a group of four, then three panels split over K, past one block
]


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_product_matches_float64_on_row_views(m, k, n, trans_b, accumulate):
    rng = np.random.default_rng(m * 1000 + k + n)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    # Row views of wider arrays: the leading dimension differs from the width.
    a = rng.standard_normal((m, k + 5)).astype(np.float32)[:, 2 : k + 2]
    c_wide = rng.standard_normal((m, n + 3)).astype(np.float32)
    c = c_wide[:, :n]
    before = c_wide.copy()
    panels.product(a, panels.pack(b, trans_b), c, accumulate)
    weight = (b.T if trans_b else b).astype(np.float64)
    expected = a.astype(np.float64) @ weight
    # float32 rounding of a K-term sum: a few units in the last place of sqrt(K) times the sum
    # of the terms' magnitudes, elementwise.
    bound = np.abs(a).astype(np.float64) @ np.abs(weight)
    if accumulate:
        expected += before[:, :n]
        bound += np.abs(before[:, :n])
    error = np.abs(c - expected)
    assert (error <= 4 * np.sqrt(k + 1) * np.finfo(np.float32).eps * bound).all(), error.max()
    np.testing.assert_array_equal(c_wide[:, n:], before[:, n:])  # nothing past the view


def test_pack_layout_puts_columns_in_panels_zero_padded():
    b = np.arange(3 * 40, dtype=np.float32).reshape(3, 40)  # K = 3, N = 40: two panels
    packed = panels.pack(b, False)
    assert packed.shape == (2 * 3 * panels.PANEL,)
    blocks = packed.reshape(2, 3, panels.PANEL)
    np.testing.assert_array_equal(blocks[0], b[:, : panels.PANEL])
    np.testing.assert_array_equal(blocks[1, :, :8], b[:, panels.PANEL :])
    assert not blocks[1, :, 8:].any()
    np.testing.assert_array_equal(panels.pack(b.T.copy(), True), packed)


def test_blas_weight_product_uses_the_panels_for_float32():
    rng = np.random.default_rng(0)
    # Fewer rows than MKL_PACK_MIN_ROWS: the panels on every CPU with AVX-512 (from there Intel
    # CPUs take MKL's packed form: test_blas.py).
    rows, k, n = blas.MKL_PACK_MIN_ROWS - 1, 64, 96
    weight = rng.standard_normal((n, k)).astype(np.float32)
    _, _, packed = blas.prepare_weight(rows, weight, True, True, blas.workspace(weight))
    assert packed.size == panels.pack(weight, True).size
    for dtype in (np.float32, np.float64):
        w = weight.astype(dtype)
        _, _, packed = blas.prepare_weight(rows, w, True, True, blas.workspace(w))
        assert (packed.size > 0) == (dtype == np.float32)  # float64 keeps BLAS


@pytest.mark.parametrize("trans_b", [False, True])
def test_pack_into_dirty_space_writes_the_zero_padding(trans_b):
    rng = np.random.default_rng(6)
    b = rng.standard_normal((37, 50)).astype(np.float32)  # N = 50: a partial second panel
    weight = b.T.copy() if trans_b else b
    expected = panels.pack(weight, trans_b)
    assert expected.size == panels.packed_size(weight, trans_b)
    space = np.full(expected.size + 5, np.nan, np.float32)
    packed = panels.pack_into(weight, trans_b, space)
    assert np.shares_memory(packed, space)
    np.testing.assert_array_equal(packed, expected)
