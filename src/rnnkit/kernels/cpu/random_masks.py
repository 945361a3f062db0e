"""Bernoulli 0/1 masks drawn by compiled code, for zoneout's (T, B, H) keep masks on CPU.

The bits come from a counter-based generator: entry i of a mask gets the high 32 bits of
SplitMix64's output function (Steele, Lea and Flood 2014, "Fast splittable pseudorandom number
generators"; the generator of Java's SplittableRandom) at key + i * gamma. The key is 64 bits
drawn from torch's default generator per mask, so torch.manual_seed fixes the masks; an entry
depends on the key and its index alone, so the entries can fill on torch's threads in any split
with the same result. An entry is 1 when its 32 bits, read as an integer, fall below
round(p * 2^32): probability p to within 2^-33.

Why not numpy's or torch's generators: constructing a numpy Generator per call (seeded from
torch) costs about 8 us, and torch's bernoulli_ takes about 6 ns an entry here. Why not numba's
Mersenne Twister (this module's previous generator, reseeded every 2^16 entries): its draws are
sequential, about 2 ns an entry, where this loop vectorises (AVX-512's 64-bit multiplies) at
about 0.65 ns.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from rnnkit.kernels.cpu import threads

# SplitMix64's constants: the odd increment gamma (2^64 / golden ratio) and the two multipliers
# of its output function (Stafford's "Mix13" variant of MurmurHash3's finaliser).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
# Entries from which the mask fills on torch's threads. Measured on 2 cores, min of 9 x 20
# calls, one thread / two: (100, 32, 128) 279 / 315 us, (200, 32, 256) 1095 / 849 us.
_MIN_THREADED = 1 << 20


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _bits(key, counter):
    """SplitMix64's output at key + counter * gamma: 64 pseudorandom bits."""
    z = key + counter * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True, error_model="numpy")
def _fill(flat, key, threshold, first, last):
    """Entries first..last-1 of flat: 1 where the high 32 bits at their index fall below
    threshold, else 0. (One draw per entry: the loop vectorises, where splitting a draw's 64
    bits between two entries measured 1.6x slower, not vectorised.)"""
    bound = np.uint64(threshold)
    for index in range(first, last):
        flat[index] = (_bits(key, np.uint64(index)) >> np.uint64(32)) < bound


def bernoulli_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
    """A float32 or float64 CPU tensor of `shape`, each entry 1 with probability p, else 0."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    mask = torch.empty(shape, dtype=dtype)
    flat = mask.numpy().reshape(-1)
    low, high = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
    key = np.uint64((high << 32) | low)
    threshold = round(p * (1 << 32))
    workers = threads.concurrency() if flat.size >= _MIN_THREADED else 1
    bounds = [flat.size * worker // workers for worker in range(workers + 1)]
    threads.run_concurrently(
        _fill,
        [(flat, key, threshold, bounds[w], bounds[w + 1]) for w in range(workers)],
    )
    return mask


def warmup() -> None:
    """Compile (or load from numba's disk cache) the mask kernel for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        bernoulli_mask((2, 3), 0.5, dtype)
