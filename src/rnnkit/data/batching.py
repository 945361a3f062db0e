"""Padding id sequences into batches, and deterministic train/valid/test splits."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def pad_batch(
    sequences: Iterable[Sequence[int]], pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """B id sequences (lists or 1-D integer tensors) -> (B, T_max) int64 padded, (B,) int64 lengths."""
    if isinstance(sequences, str | bytes) or not isinstance(sequences, Iterable):
        raise TypeError(f"sequences must be a list of id lists, got {type(sequences).__name__}")
    sequences = list(sequences)
    if not sequences:
        raise ValueError("sequences must hold at least one sequence, got an empty list")
    if isinstance(pad, bool) or not isinstance(pad, int):
        raise TypeError(f"pad must be an int, got {pad!r}")
    rows = []
    for index, sequence in enumerate(sequences):
        row = torch.as_tensor(sequence)
        if row.dim() != 1:
            raise ValueError(f"sequences[{index}] must be 1-D, got shape {tuple(row.shape)}")
        if row.numel() == 0:
            raise ValueError(f"sequences[{index}] is empty; every sequence needs length >= 1")
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise TypeError(f"sequences[{index}] must hold integer ids, got dtype {row.dtype}")
        rows.append(row.to(torch.int64))
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    padded = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.int64)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    return padded, lengths


def split_indices(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n items -> shuffled (train, valid, test) int64 index arrays, the same for the same seed.

    Sizes are the rounded fractions of n; a split with a positive fraction gets at least one
    item whenever n allows it.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {seed!r}")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be 3 non-negative numbers, got {fractions!r}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions)})")
    n = int(n)
    sizes = [round(f * n) for f in fractions[:2]]
    sizes.append(n - sum(sizes))
    if sizes[2] < 0:  # both roundings went up
        sizes[1] += sizes[2]
        sizes[2] = 0
    wanted = [index for index, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for index in wanted:
            if sizes[index] == 0:
                sizes[sizes.index(max(sizes))] -= 1
                sizes[index] = 1
    order = np.random.default_rng(int(seed)).permutation(n).astype(np.int64)
    train_end, valid_end = sizes[0], sizes[0] + sizes[1]
    return order[:train_end], order[train_end:valid_end], order[valid_end:]
