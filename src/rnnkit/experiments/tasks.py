"""Synthetic sequence tasks with known chance baselines, generated from a seeded torch.Generator.

- adding problem (Hochreiter & Schmidhuber 1997; the form of Arjovsky et al. 2016): two channels,
  uniform values and a marker that is 1 at one step in each half; the target is the sum of the
  two marked values. Predicting the mean gives MSE = Var(u1 + u2) = 1/6 ~ 0.167.
- copy task (Arjovsky et al. 2016): 10 symbols from an alphabet of 8, `delay` blanks with a
  delimiter at the last of them, then 10 blanks during which the symbols must be reproduced.
  Predicting blanks then uniform symbols costs 10 ln 8 / (delay + 20) nats per step.
- context tagging: tokens from `classes` symbols; the tag at t is the sum of the tokens at the
  given offsets (t + o, zero outside the sequence) modulo `classes`. Chance accuracy 1/classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

COPY_SYMBOLS = 8
COPY_LENGTH = 10
COPY_VOCAB = COPY_SYMBOLS + 2  # 0 blank, 1..8 symbols, 9 delimiter


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


def adding_problem(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(B, T, 2) inputs (value, marker), (B, 1) targets: the sum of the two marked values."""
    _check_positive("adding_problem", batch=batch, length=length)
    if length < 2:
        raise ValueError(f"adding_problem: length must be >= 2, got {length}")
    values = torch.rand(batch, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, length, (batch,), generator=generator)
    markers = torch.zeros(batch, length)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values * markers).sum(dim=1, keepdim=True)
    return torch.stack([values, markers], dim=-1), targets


def copy_task(batch: int, delay: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(B, delay + 20, 10) one-hot inputs, (B, delay + 20) int64 targets (0 = blank)."""
    _check_positive("copy_task", batch=batch, delay=delay)
    steps = delay + 2 * COPY_LENGTH
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (batch, COPY_LENGTH), generator=generator)
    tokens = torch.zeros(batch, steps, dtype=torch.int64)
    tokens[:, :COPY_LENGTH] = symbols
    tokens[:, COPY_LENGTH + delay - 1] = COPY_SYMBOLS + 1
    targets = torch.zeros(batch, steps, dtype=torch.int64)
    targets[:, -COPY_LENGTH:] = symbols
    return F.one_hot(tokens, COPY_VOCAB).float(), targets


def copy_chance_cross_entropy(delay: int) -> float:
    """Per-step cross-entropy (nats) of predicting blanks, then uniform symbols for the copy."""
    return COPY_LENGTH * math.log(COPY_SYMBOLS) / (delay + 2 * COPY_LENGTH)


def context_tagging(
    batch: int,
    length: int,
    offsets: tuple[int, ...],
    classes: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """(B, T, classes) one-hot tokens, (B, T) int64 tags = sum of tokens at t + offsets mod classes."""
    _check_positive("context_tagging", batch=batch, length=length, classes=classes)
    if not offsets:
        raise ValueError("context_tagging: offsets must name at least one offset, got ()")
    if any(abs(offset) >= length for offset in offsets):
        raise ValueError(
            f"context_tagging: offsets must lie in (-{length}, {length}), got {offsets}"
        )
    tokens = torch.randint(0, classes, (batch, length), generator=generator)
    tags = torch.zeros_like(tokens)
    for offset in offsets:
        shifted = torch.zeros_like(tokens)
        if offset >= 0:
            shifted[:, : length - offset] = tokens[:, offset:]
        else:
            shifted[:, -offset:] = tokens[:, : length + offset]
        tags = tags + shifted
    return F.one_hot(tokens, classes).float(), tags % classes
