"""One Trainer for every application: AdamW, warmup + cosine schedule, gradient clipping,
truncated BPTT with a detached carried state, early stopping, exact resumption, DDP.

An application describes itself as a `TrainingTask`: deterministic global batches per epoch,
a loss on one batch (which may carry recurrent state to the next batch), and an evaluation
returning the validation metric. The trainer owns everything else.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rnnkit.train.checkpoint import (
    Carry,
    TrainingState,
    fault_pause,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rnnkit.train.distributed import DistributedContext, any_process, mean_over_processes
from rnnkit.train.rundir import RunError

Batch = tuple[Tensor, ...]
ON_NAN_POLICIES = ("skip", "stop")
# Each skipped non-finite step multiplies the learning rate (for the rest of the run) by this.
NAN_LR_FACTOR = 0.5


@dataclass
class TrainerConfig:
    """Optimisation hyperparameters; `max_steps` (if set) caps the steps of `epochs` epochs.

    The validation metric is computed at every epoch end, and every `eval_every` steps if set;
    early stopping counts those evaluations.
    """

    epochs: int = 10
    max_steps: int | None = None
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_fraction: float = 0.1
    clip_grad_norm: float | None = 1.0
    patience: int | None = 3
    checkpoint_every: int | None = 200
    eval_every: int | None = None
    progress: bool = True
    # A non-finite loss or gradient: "skip" the step and halve the learning rate, or "stop".
    on_nan: str = "skip"

    def __post_init__(self) -> None:
        if self.on_nan not in ON_NAN_POLICIES:
            raise ValueError(
                f"TrainerConfig: on_nan must be one of {ON_NAN_POLICIES}, got {self.on_nan!r}"
            )
        for name in ("epochs", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "epochs" else 0):
                raise ValueError(f"TrainerConfig: {name} must be a positive int, got {value!r}")
        for name in ("max_steps", "patience", "checkpoint_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"TrainerConfig: {name} must be None or an int >= 1, got {value!r}"
                )
        if not self.learning_rate > 0:
            raise ValueError(f"TrainerConfig: learning_rate must be > 0, got {self.learning_rate}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(
                f"TrainerConfig: clip_grad_norm must be None or > 0, got {self.clip_grad_norm}"
            )


@dataclass
class StepOutput:
    """What a task's loss returns: the mean loss of the batch, the state to carry, token count."""

    loss: Tensor
    carry: Carry = None
    tokens: int = 0


class TrainingTask(Protocol):
    """What the trainer needs to know about an application."""

    metric: str
    higher_is_better: bool

    def steps_per_epoch(self) -> int: ...

    def batches(self, epoch: int) -> Iterable[Batch]:
        """The epoch's global batches (batch dimension first), the same for a given epoch."""
        ...

    def loss(self, model: nn.Module, batch: Batch, carry: Carry) -> StepOutput: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


class NonFiniteTraining(RunError):
    """The loss or a gradient was NaN/inf with on_nan="stop"; the last good state is saved."""


class TrainingInterrupted(Exception):
    """Training stopped on request; a checkpoint at `step` lets `--resume` continue exactly."""

    def __init__(self, step: int, checkpoint_dir: Path | None) -> None:
        where = f"; checkpoint saved in {checkpoint_dir}" if checkpoint_dir else ""
        super().__init__(f"training interrupted at step {step}{where}")
        self.step = step
        self.checkpoint_dir = checkpoint_dir


def learning_rate_at(step: int, total_steps: int, config: TrainerConfig) -> float:
    """Linear warmup to the peak rate, then cosine decay to min_lr_fraction of it."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr_fraction * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def detach_state(carry: Carry) -> Carry:
    """Cut the autograd graph at a chunk boundary (truncated BPTT), keeping the values."""
    if carry is None:
        return None
    if isinstance(carry, Tensor):
        return carry.detach()
    return tuple(part.detach() for part in carry)


def shard_batch(batch: Batch, context: DistributedContext) -> Batch:
    """This process's contiguous slice of a global batch (batch dimension first)."""
    if not context.enabled:
        return batch
    size = batch[0].size(0)
    if size % context.world_size:
        raise ValueError(
            f"global batch size must be divisible by the number of processes "
            f"{context.world_size}, got {size}"
        )
    return tuple(t.tensor_split(context.world_size)[context.rank] for t in batch)


def make_optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norms are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


@dataclass
class _EpochTotals:
    loss_sum: float = 0.0
    steps: int = 0
    grad_norm_sum: float = 0.0
    clipped: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0
    grad_norm_max: float = 0.0


@dataclass
class Trainer:
    """Trains `model` on `task`; checkpoints to `checkpoint_dir` (None: no checkpoints)."""

    model: nn.Module
    task: TrainingTask
    config: TrainerConfig
    checkpoint_dir: Path | None = None
    context: DistributedContext = field(default_factory=DistributedContext)
    on_step: Callable[[Trainer, int], None] | None = None
    state: TrainingState = field(default_factory=TrainingState)

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.model, self.config)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.stop_requested = False
        self.best_weights: dict[str, Tensor] | None = None
        self.carry: Carry = None
        if self.context.enabled:
            device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            self.train_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids
            )
        else:
            self.train_model = self.model

    @property
    def total_steps(self) -> int:
        """Steps this run takes unless it stops early."""
        total = self.config.epochs * self.task.steps_per_epoch()
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def request_stop(self) -> None:
        """Stop after the current step, save a checkpoint and raise TrainingInterrupted."""
        self.stop_requested = True

    def resume(self) -> None:
        """Load the newest checkpoint in checkpoint_dir: model, optimizer, RNG, position."""
        if self.checkpoint_dir is None or not has_checkpoint(self.checkpoint_dir):
            raise FileNotFoundError(f"no checkpoint to resume in {self.checkpoint_dir}")
        loaded = load_checkpoint(self.checkpoint_dir)
        unknown = set(loaded.state.epoch_totals) - set(_EpochTotals.__dataclass_fields__)
        if unknown:
            raise RunError(f"{loaded.source}: unknown epoch totals {sorted(unknown)}")
        self.carry, self.best_weights = loaded.restore(
            self.model, self.optimizer, self.context.device
        )
        self.state = loaded.state
        self.state.finished = False
        self.state.stop_reason = None

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step (main process only)."""
        if self.checkpoint_dir is not None and self.context.is_main:
            save_checkpoint(
                self.checkpoint_dir,
                self.model,
                self.optimizer,
                self.state,
                self.carry,
                self.best_weights,
            )

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainingState:
        """Train until the epochs or max_steps are done or early stopping fires; restore best."""
        with _stop_on_sigint(self):
            self._loop()
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return self.state

    def _loop(self) -> None:
        state, config = self.state, self.config
        total = self.total_steps
        totals = _EpochTotals(**state.epoch_totals)
        bar = tqdm(
            total=total,
            initial=state.step,
            disable=not (config.progress and self.context.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        smoothed: float | None = None
        try:
            while state.epoch < config.epochs and state.step < total and not state.finished:
                for index, batch in enumerate(self.task.batches(state.epoch)):
                    if index < state.batch_in_epoch:
                        continue
                    if state.step >= total:
                        break
                    started = time.perf_counter()
                    loss, tokens, grad_norm, finite = self._train_step(batch, state.step, total)
                    if not finite:
                        state.epoch_totals = totals.__dict__.copy()
                        self._handle_nonfinite(loss, grad_norm, bar)
                        totals.skipped += 1
                    state.step += 1
                    state.batch_in_epoch = index + 1
                    if finite:
                        totals.loss_sum += loss
                        totals.steps += 1
                        totals.grad_norm_sum += grad_norm
                        totals.grad_norm_max = max(totals.grad_norm_max, grad_norm)
                        clip = config.clip_grad_norm
                        clipped = clip is not None and grad_norm > clip
                        totals.clipped += int(clipped)
                        state.clipped_steps += int(clipped)
                        smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
                    totals.tokens += tokens * self.context.world_size
                    totals.seconds += time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{smoothed if smoothed is not None else math.nan:.3f}",
                        tok_s=f"{totals.tokens / max(totals.seconds, 1e-9):,.0f}",
                        gnorm=f"{grad_norm:.2f}",
                        **({"skipped": state.skipped_steps} if state.skipped_steps else {}),
                    )
                    mid_epoch = state.batch_in_epoch < self.task.steps_per_epoch()
                    if config.eval_every and state.step % config.eval_every == 0 and mid_epoch:
                        self._evaluate_and_record(totals, partial=True)
                        totals = _EpochTotals()
                    if self.on_step is not None:
                        self.on_step(self, state.step)
                    fault_pause(f"step:{state.step}")
                    state.epoch_totals = totals.__dict__.copy()
                    if any_process(self.stop_requested, self.context):
                        self.save_checkpoint()
                        raise TrainingInterrupted(state.step, self.checkpoint_dir)
                    if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if state.finished:
                        break
                epoch_done = state.batch_in_epoch >= self.task.steps_per_epoch()
                if epoch_done or totals.steps + totals.skipped > 0:
                    self._evaluate_and_record(totals, partial=not epoch_done)
                totals = _EpochTotals()
                state.epoch_totals = {}
                if epoch_done:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    self.carry = None
                self.save_checkpoint()
        finally:
            bar.close()
        if not state.finished:
            state.finished = True
            capped = config.max_steps is not None and state.step >= config.max_steps
            state.stop_reason = "max_steps" if capped else "epochs"
        self.save_checkpoint()

    def _train_step(self, batch: Batch, step: int, total: int) -> tuple[float, int, float, bool]:
        """One optimizer step -> (loss, tokens, gradient norm before clipping, whether finite);
        a non-finite loss or gradient norm (on any process) leaves the weights untouched."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total, self.config) * self.state.lr_scale
        self.train_model.train()
        local = shard_batch(tuple(t.to(self.context.device) for t in batch), self.context)
        output = self.task.loss(self.train_model, local, self.carry)
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        limit = self.config.clip_grad_norm
        grad_norm = nn.utils.clip_grad_norm_(
            self.parameters, limit if limit is not None else math.inf
        )
        loss, grad_norm = float(output.loss.detach()), float(grad_norm)
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if any_process(bad, self.context):
            self.optimizer.zero_grad(set_to_none=True)
            return loss, int(output.tokens), grad_norm, False
        self.optimizer.step()
        self.carry = detach_state(output.carry)
        return loss, int(output.tokens), grad_norm, True

    def _handle_nonfinite(self, loss: float, grad_norm: float, bar: tqdm) -> None:
        """Report a skipped step and lower the learning rate, or save and stop (on_nan="stop")."""
        state = self.state
        step = state.step + 1
        what = f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm})"
        if self.config.on_nan == "stop":
            self.save_checkpoint()
            saved = self.checkpoint_dir is not None
            where = f"; the last good state is saved in {self.checkpoint_dir}" if saved else ""
            raise NonFiniteTraining(
                f"{what} with --on-nan stop{where}. Lower --learning-rate, check the data, or "
                "resume with --on-nan skip"
            )
        self.carry = None  # the chunk's state may hold NaN: the next chunk starts afresh
        state.skipped_steps += 1
        state.lr_scale *= NAN_LR_FACTOR
        state.nonfinite_events.append(
            {"step": step, "loss": loss, "grad_norm": grad_norm, "lr_scale": state.lr_scale}
        )
        del state.nonfinite_events[:-100]
        if self.context.is_main:
            bar.write(
                f"rnnkit: {what}; skipped the step, learning rate now x{state.lr_scale:g}",
                file=sys.stderr,
            )

    def _evaluate_and_record(self, totals: _EpochTotals, partial: bool) -> None:
        state, config = self.state, self.config
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model)
        value = float(metrics[self.task.metric])
        steps = max(totals.steps, 1)
        record: dict[str, Any] = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "partial_epoch": partial,
            "train_loss": mean_over_processes(totals.loss_sum / steps, self.context),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "grad_norm_mean": totals.grad_norm_sum / steps,
            "grad_norm_max": totals.grad_norm_max,
            "clipped_fraction": totals.clipped / steps,
            "skipped_steps": totals.skipped,
            "tokens_per_second": totals.tokens / max(totals.seconds, 1e-9),
            "seconds": totals.seconds,
        }
        record.update({f"valid_{k}": float(v) for k, v in metrics.items()})
        state.history.append(record)
        better = state.best_metric is None or (
            value > state.best_metric if self.task.higher_is_better else value < state.best_metric
        )
        if better:
            state.best_metric = value
            state.best_step = state.step
            state.evaluations_without_improvement = 0
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            state.evaluations_without_improvement += 1
            if config.patience and state.evaluations_without_improvement >= config.patience:
                state.finished = True
                state.stop_reason = "early_stopping"


class _stop_on_sigint:
    """First Ctrl-C asks the trainer to stop after the current step; a second one aborts."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.trainer.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
