"""Bernoulli 0/1 masks drawn by compiled code, for zoneout's (T, B, H) keep masks on CPU.

The bits come from numba's Mersenne Twister (its compiled version of Python's `random`, one
state per thread), reseeded for every chunk of CHUNK entries with seeds drawn from torch's
default generator: torch.manual_seed fixes the masks, and the chunks can fill on torch's threads
in any order with the same result for any thread count. An entry is 1 when its 32 random bits,
read as an integer, fall below round(p * 2^32): probability p to within 2^-33.

Why not numpy's Generator: constructing one per call (seeded from torch) costs about 8 us, and
with the conversions around it the mask took 34 us at (100, 1, 64) alone and about 95 us inside
a batch-1 training step; this module's call takes about 13 us there, and fills 32-bit floats at
about the same 2 ns an entry as numpy at (100, 32, 128), before the threads.
"""

from __future__ import annotations

import random

import torch
from numba import njit
from torch import Tensor

from rnnkit.kernels.cpu import threads

# Entries per seed: reseeding (624 words of state) costs about 1 us, a chunk about 130 us.
CHUNK = 1 << 16


@njit(cache=True, nogil=True)
def _fill_chunks(flat, seeds, threshold, first, stride):
    """Chunks first, first + stride, ... of flat: 1 where the bits fall below threshold."""
    for chunk in range(first, seeds.size, stride):
        random.seed(seeds[chunk])
        for index in range(chunk * CHUNK, min((chunk + 1) * CHUNK, flat.size)):
            flat[index] = 1.0 if random.getrandbits(32) < threshold else 0.0


def bernoulli_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
    """A float32 or float64 CPU tensor of `shape`, each entry 1 with probability p, else 0."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    mask = torch.empty(shape, dtype=dtype)
    flat = mask.numpy().reshape(-1)
    chunks = max(1, -(-flat.size // CHUNK))
    seeds = torch.randint(0, 1 << 32, (chunks,), dtype=torch.int64).numpy()
    threshold = round(p * (1 << 32))
    workers = min(chunks, threads.concurrency())
    threads.run_concurrently(
        _fill_chunks, [(flat, seeds, threshold, first, workers) for first in range(workers)]
    )
    return mask


def warmup() -> None:
    """Compile (or load from numba's disk cache) the mask kernel for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        bernoulli_mask((2, 3), 0.5, dtype)
