"""Training checkpoints for exact resumption: safetensors for tensors, JSON for the rest.

A checkpoint is a directory `checkpoint/step-NNNNNNNN/` holding `tensors.safetensors` (model,
optimizer moments, RNG states as uint8 tensors, carried recurrent state, best weights) and
`state.json` (step, epoch, position in the epoch, history, early-stopping state, optimizer
hyperparameters). `checkpoint/latest.json` names the newest complete one; it is replaced
atomically after the step directory is fully written, so a crash mid-save leaves the previous
checkpoint in charge.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rnnkit.train.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

LATEST = "latest.json"
Carry = Tensor | tuple[Tensor, ...] | None


@dataclass
class TrainingState:
    """Everything besides the model and optimizer that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    evaluations_without_improvement: int = 0
    finished: bool = False
    stop_reason: str | None = None
    epoch_totals: dict[str, float] = field(default_factory=dict)


def rng_tensors() -> dict[str, Tensor]:
    """The torch RNG states (CPU and every CUDA device) as uint8 tensors."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    return tensors


def restore_rng(tensors: dict[str, Tensor]) -> None:
    """Set the torch RNG states saved by `rng_tensors`."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted(
        (int(name.rsplit(".", 1)[1]), t)
        for name, t in tensors.items()
        if name.startswith("rng.cuda.")
    )
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t for _, t in cuda])


def _carry_to_tensors(carry: Carry) -> tuple[str, dict[str, Tensor]]:
    if carry is None:
        return "none", {}
    if isinstance(carry, Tensor):
        return "tensor", {"carry.0": carry}
    return "tuple", {f"carry.{i}": t for i, t in enumerate(carry)}


def _carry_from_tensors(kind: str, tensors: dict[str, Tensor], device) -> Carry:
    if kind == "none":
        return None
    parts = sorted((int(n.split(".")[1]), t) for n, t in tensors.items() if n.startswith("carry."))
    values = tuple(t.to(device) for _, t in parts)
    return values[0] if kind == "tensor" else values


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """optimizer.state_dict() -> (tensors, JSON-serialisable rest)."""
    saved = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in saved["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": saved["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, Tensor], rest: dict) -> dict:
    """Inverse of `_optimizer_split`: a dict for optimizer.load_state_dict."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in rest["param_groups"]:
        groups.append(
            {
                k: (tuple(v) if isinstance(v, list) and k != "params" else v)
                for k, v in group.items()
            }
        )
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    carry: Carry = None,
    best_weights: dict[str, Tensor] | None = None,
    keep: int = 1,
) -> Path:
    """Write a complete checkpoint under `directory` and point latest.json at it."""
    directory = Path(directory)
    step_dir = directory / f"step-{state.step:08d}"
    optimizer_tensors, optimizer_rest = _optimizer_split(optimizer)
    carry_kind, carry_tensors = _carry_to_tensors(carry)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors)
    tensors.update(rng_tensors())
    tensors.update(carry_tensors)
    if best_weights is not None:
        tensors.update({f"best.{k}": v for k, v in best_weights.items()})
    atomic_save_tensors(step_dir / "tensors.safetensors", tensors, {"step": str(state.step)})
    atomic_write_json(
        step_dir / "state.json",
        {
            "training": state.__dict__,
            "optimizer": optimizer_rest,
            "carry": carry_kind,
            "has_best_weights": best_weights is not None,
        },
    )
    atomic_write_json(directory / LATEST, {"step": state.step, "directory": step_dir.name})
    older = sorted(p for p in directory.glob("step-*") if p.is_dir() and p != step_dir)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return step_dir


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: apply it with `restore`."""

    state: TrainingState
    tensors: dict[str, Tensor]
    optimizer_rest: dict
    carry_kind: str
    has_best_weights: bool

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device=None
    ) -> tuple[Carry, dict[str, Tensor] | None]:
        """Load model, optimizer and RNG states in place; return (carry, best weights)."""
        model.load_state_dict(self.section("model."))
        optimizer.load_state_dict(_optimizer_join(self.tensors, self.optimizer_rest))
        restore_rng(self.tensors)
        device = device if device is not None else next(model.parameters()).device
        carry = _carry_from_tensors(self.carry_kind, self.tensors, device)
        best = self.section("best.") if self.has_best_weights else None
        return carry, best

    def section(self, prefix: str) -> dict[str, Tensor]:
        """The tensors whose names start with `prefix`, with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def has_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a complete checkpoint."""
    return (Path(directory) / LATEST).is_file()


def load_checkpoint(directory: str | Path) -> LoadedCheckpoint:
    """Read the newest complete checkpoint under `directory`."""
    directory = Path(directory)
    latest = read_json(directory / LATEST)
    step_dir = directory / latest["directory"]
    tensors = load_tensors(step_dir / "tensors.safetensors")
    saved = read_json(step_dir / "state.json")
    state = TrainingState(**saved["training"])
    if state.step != latest["step"]:
        raise ValueError(
            f"checkpoint {step_dir}: state.json is at step {state.step}, "
            f"latest.json names step {latest['step']}"
        )
    return LoadedCheckpoint(
        state=state,
        tensors=tensors,
        optimizer_rest=saved["optimizer"],
        carry_kind=saved["carry"],
        has_best_weights=saved["has_best_weights"],
    )
