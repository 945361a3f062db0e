"""rnnkit.kernels.cpu.random_masks: compiled Bernoulli masks for zoneout."""

from __future__ import annotations

import pytest
import torch

from rnnkit.kernels.cpu import random_masks
from rnnkit.kernels.cpu.random_masks import bernoulli_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_seed_gives_the_same_mask_on_any_number_of_threads(dtype):
    shape = (3, 349_527, 1)  # above the threaded minimum, split unevenly
    assert shape[0] * shape[1] >= random_masks._MIN_THREADED
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(7)
        one = bernoulli_mask(shape, 0.3, dtype)
        torch.set_num_threads(2)
        torch.manual_seed(7)
        two = bernoulli_mask(shape, 0.3, dtype)
    finally:
        torch.set_num_threads(threads)
    assert one.dtype == dtype and one.shape == shape
    assert torch.equal(one, two)
    assert abs(one.double().mean().item() - 0.3) < 0.003  # 1M draws: std 0.0005


def test_neighbouring_entries_are_uncorrelated_and_masks_differ_per_call():
    torch.manual_seed(3)
    flat = bernoulli_mask((200_000,), 0.3, torch.float64)
    for lag in (1, 2, 7, 64):
        both = (flat[lag:] * flat[:-lag]).mean().item()
        assert abs(both - 0.09) < 0.006, lag  # 200k pairs: std 0.0006
    assert not torch.equal(flat, bernoulli_mask((200_000,), 0.3, torch.float64))


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7)])
def test_small_and_odd_sizes_fill_every_entry(shape):
    mask = bernoulli_mask(shape, 1.0, torch.float32)
    assert torch.equal(mask, torch.ones(shape))
    torch.manual_seed(11)
    values = torch.stack([bernoulli_mask(shape, 0.5, torch.float32) for _ in range(200)])
    assert set(values.unique().tolist()) == {0.0, 1.0}
    assert (values.mean(0) - 0.5).abs().max() < 0.15  # 200 draws each: std 0.035


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_probabilities_zero_and_one_are_exact(p):
    assert torch.equal(bernoulli_mask((40, 50), p, torch.float32), torch.full((40, 50), p))


def test_bad_dtype_and_probability_are_refused_by_name():
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        bernoulli_mask((2, 2), 0.5, torch.float16)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        bernoulli_mask((2, 2), 1.5, torch.float32)


def test_warmup_compiles_both_dtypes():
    random_masks.warmup()
    assert len(random_masks._fill.signatures) >= 2
