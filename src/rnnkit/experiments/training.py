"""A plain training loop for the experiments: Adam, fixed number of updates, optional clipping.

The experiments keep their own small loop so that each one states its whole budget (updates,
batch, learning rate, clipping) in its config and nothing else changes it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

Batch = tuple[Tensor, Tensor]
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class TrainingLog:
    """Per-update loss and gradient norm (before clipping), and the wall time of the run."""

    losses: list[float] = field(default_factory=list)
    gradient_norms: list[float] = field(default_factory=list)
    skipped_updates: int = 0
    seconds: float = 0.0

    def final_loss(self, window: int = 20) -> float:
        """Mean of the last `window` training losses."""
        tail = self.losses[-window:]
        return sum(tail) / len(tail) if tail else math.nan


def train(
    model: nn.Module,
    next_batch: Callable[[], Batch],
    loss_of: Callable[[Tensor, Tensor], Tensor],
    updates: int,
    learning_rate: float,
    clip_norm: float | None,
    description: str,
    optimizer_name: str = "adam",
) -> TrainingLog:
    """Run `updates` Adam (or plain SGD) steps on batches from `next_batch`; clip if asked.

    An update whose gradient norm is not finite is skipped and counted in the log.
    """
    if not isinstance(updates, int) or updates < 0:
        raise ValueError(f"train: updates must be an int >= 0, got {updates!r}")
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(
            f"train: optimizer_name must be one of {tuple(OPTIMIZERS)}, got {optimizer_name!r}"
        )
    optimizer = OPTIMIZERS[optimizer_name](model.parameters(), lr=learning_rate)
    log = TrainingLog()
    model.train()
    start = time.perf_counter()
    for _ in tqdm(range(updates), desc=description, leave=False, mininterval=2.0):
        inputs, targets = next_batch()
        loss = loss_of(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        limit = clip_norm if clip_norm is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        log.losses.append(loss.item())
        log.gradient_norms.append(norm.item())
        if math.isfinite(norm.item()):
            optimizer.step()
        else:
            log.skipped_updates += 1
    log.seconds = time.perf_counter() - start
    model.eval()
    return log


def median_ms(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of `work()` in milliseconds over `repeats` runs, after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
