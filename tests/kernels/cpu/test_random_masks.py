"""rnnkit.kernels.cpu.random_masks: compiled Bernoulli masks for zoneout."""

from __future__ import annotations

import pytest
import torch

from rnnkit.kernels.cpu import random_masks
from rnnkit.kernels.cpu.random_masks import CHUNK, bernoulli_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_seed_gives_the_same_mask_on_any_number_of_threads(dtype):
    shape = (3, CHUNK // 2 + 5, 2)  # three chunks and a part
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
    flat = one.view(-1)
    # Each chunk has its own seed: neighbouring chunks are not copies of each other.
    assert not torch.equal(flat[:CHUNK], flat[CHUNK : 2 * CHUNK])
    assert abs(flat.double().mean().item() - 0.3) < 0.005  # 196k draws: std 0.001


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
    assert len(random_masks._fill_chunks.signatures) >= 2
