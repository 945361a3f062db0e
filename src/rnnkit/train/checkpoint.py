"""Training checkpoints for exact resumption: safetensors for tensors, JSON for the rest.

A checkpoint is a directory `checkpoint/step-NNNNNNNN/` holding `tensors.safetensors` (model,
optimizer moments, RNG states as uint8 tensors, carried recurrent state, best weights) and
`state.json` (step, epoch, position in the epoch, history, early-stopping state, optimizer
hyperparameters, the SHA-256 of the tensors file). `checkpoint/latest.json` names the newest
complete one; it is replaced atomically after the step directory is fully written, so a crash
mid-save leaves the previous checkpoint in charge. Loading never unpickles anything and checks
the files against each other and against the model: a corrupt or mismatched checkpoint is a
RunError naming the file and the problem.

`RNNKIT_FAULT_PAUSE=<point>` (for tests) makes the process stop and wait at that point so that a
test can kill it there: `step:N` after step N, `checkpoint-rename:N` with step N's tensors written
to their temporary file but not yet renamed, `checkpoint-latest:N` with step N written but not
yet named by latest.json.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from rnnkit.data.errors import DataError
from rnnkit.io import atomic_path
from rnnkit.train.io import atomic_write_json, read_json
from rnnkit.train.rundir import RunError

LATEST = "latest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
FAULT_PAUSE_ENV = "RNNKIT_FAULT_PAUSE"
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
    # Numerical trouble: steps skipped for a non-finite loss or gradient (each halves lr_scale),
    # and steps whose gradient norm was clipped.
    skipped_steps: int = 0
    clipped_steps: int = 0
    lr_scale: float = 1.0
    nonfinite_events: list[dict[str, Any]] = field(default_factory=list)


def fault_pause(point: str) -> None:
    """Test hook: announce `point` on stderr and wait to be killed, if RNNKIT_FAULT_PAUSE names it."""
    if os.environ.get(FAULT_PAUSE_ENV) == point:
        sys.stderr.write(f"rnnkit: paused at {point}\n")
        sys.stderr.flush()
        time.sleep(600)


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
    _remove_temporaries(directory)
    optimizer_tensors, optimizer_rest = _optimizer_split(optimizer)
    carry_kind, carry_tensors = _carry_to_tensors(carry)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors)
    tensors.update(rng_tensors())
    tensors.update(carry_tensors)
    if best_weights is not None:
        tensors.update({f"best.{k}": v for k, v in best_weights.items()})
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    data = save_safetensors_bytes(prepared, metadata={"step": str(state.step)})
    with atomic_path(step_dir / TENSORS) as temporary, open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
        fault_pause(f"checkpoint-rename:{state.step}")
    atomic_write_json(
        step_dir / STATE,
        {
            "training": state.__dict__,
            "optimizer": optimizer_rest,
            "carry": carry_kind,
            "has_best_weights": best_weights is not None,
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
        },
    )
    fault_pause(f"checkpoint-latest:{state.step}")
    atomic_write_json(directory / LATEST, {"step": state.step, "directory": step_dir.name})
    older = sorted(p for p in directory.glob("step-*") if p.is_dir() and p != step_dir)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return step_dir


def _remove_temporaries(directory: Path) -> None:
    """Delete the temporary files of saves that a killed process left half-written."""
    for pattern in (".*.tmp", "step-*/.*.tmp"):
        for leftover in directory.glob(pattern):
            leftover.unlink(missing_ok=True)


def check_weights(model: torch.nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """RunError naming the first key, shape or dtype where `tensors` does not fit `model`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise RunError(
            f"{source} does not fit the model described by config.json: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise RunError(
                f"{source}: {name} is {tuple(got.shape)} {got.dtype}, the model described by "
                f"config.json needs {tuple(want.shape)} {want.dtype}"
            )


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: apply it with `restore`."""

    state: TrainingState
    tensors: dict[str, Tensor]
    optimizer_rest: dict
    carry_kind: str
    has_best_weights: bool
    source: str = "checkpoint"

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device=None
    ) -> tuple[Carry, dict[str, Tensor] | None]:
        """Load model, optimizer and RNG states in place; return (carry, best weights).

        Everything is checked before anything is changed: a mismatch is a RunError and leaves
        the model, optimizer and RNG as they were."""
        weights = self.section("model.")
        check_weights(model, weights, self.source)
        best = self.section("best.") if self.has_best_weights else None
        if best is not None:
            check_weights(model, best, f"{self.source} (best weights)")
        rng = self.tensors.get("rng.cpu")
        if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
            raise RunError(f"{self.source}: the saved random-number state is missing or malformed")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        try:
            joined = _optimizer_join(self.tensors, self.optimizer_rest)
            for index, values in joined["state"].items():
                for key, value in values.items():
                    # Moments have their parameter's shape; torch does not check that on load.
                    if isinstance(value, Tensor) and value.dim() > 0:
                        if value.shape != params[index].shape:
                            raise ValueError(
                                f"optimizer.{index}.{key} is {tuple(value.shape)}, its parameter "
                                f"is {tuple(params[index].shape)}"
                            )
            optimizer.load_state_dict(joined)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
            raise RunError(
                f"{self.source}: the optimizer state does not fit the model ({error})"
            ) from None
        model.load_state_dict(weights)
        restore_rng(self.tensors)
        device = device if device is not None else next(model.parameters()).device
        try:
            carry = _carry_from_tensors(self.carry_kind, self.tensors, device)
        except (ValueError, IndexError) as error:
            raise RunError(
                f"{self.source}: the carried recurrent state is malformed ({error})"
            ) from None
        return carry, best

    def section(self, prefix: str) -> dict[str, Tensor]:
        """The tensors whose names start with `prefix`, with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def has_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a complete checkpoint."""
    return (Path(directory) / LATEST).is_file()


def load_checkpoint(directory: str | Path) -> LoadedCheckpoint:
    """Read the newest complete checkpoint under `directory` (RunError if it is unusable)."""
    directory = Path(directory)
    latest = _read_json_object(directory / LATEST)
    name, step = latest.get("directory"), latest.get("step")
    if not (isinstance(name, str) and name.startswith("step-") and "/" not in name):
        raise RunError(f"{directory / LATEST}: 'directory' must name a step-* folder, got {name!r}")
    step_dir = directory / name
    saved = _read_json_object(step_dir / STATE)
    known = {f.name for f in fields(TrainingState)}
    training = saved.get("training")
    if not isinstance(training, dict) or set(training) - known:
        raise RunError(f"{step_dir / STATE}: 'training' is not a training state")
    problem = _training_state_problem(training)
    if problem:
        raise RunError(f"{step_dir / STATE}: 'training' is not a training state ({problem})")
    state = TrainingState(**training)
    if state.step != step:
        raise RunError(
            f"checkpoint {step_dir}: state.json is at step {state.step}, "
            f"latest.json names step {step}"
        )
    tensors_path = step_dir / TENSORS
    try:
        data = tensors_path.read_bytes()
    except OSError as error:
        raise RunError(f"{tensors_path}: cannot be read ({error.strerror})") from None
    if hashlib.sha256(data).hexdigest() != saved.get("tensors_sha256"):
        raise RunError(
            f"{tensors_path}: its SHA-256 differs from the one state.json recorded; the file is "
            "corrupt (truncated or changed) and cannot be resumed from"
        )
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as error:
        raise RunError(f"{tensors_path}: not a valid safetensors file ({error})") from None
    for key in ("optimizer", "carry", "has_best_weights"):
        if key not in saved:
            raise RunError(f"{step_dir / STATE}: '{key}' is missing")
    if saved["carry"] not in ("none", "tensor", "tuple"):
        raise RunError(
            f"{step_dir / STATE}: 'carry' must be none/tensor/tuple, got {saved['carry']!r}"
        )
    return LoadedCheckpoint(
        state=state,
        tensors=tensors,
        optimizer_rest=saved["optimizer"],
        carry_kind=saved["carry"],
        has_best_weights=saved["has_best_weights"],
        source=str(tensors_path),
    )


def _training_state_problem(training: dict[str, Any]) -> str | None:
    """What makes a saved training state unusable (wrong JSON types), or None."""
    counters = ("step", "epoch", "batch_in_epoch", "evaluations_without_improvement")
    for name in (*counters, "skipped_steps", "clipped_steps"):
        value = training.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name} must be an int >= 0, got {value!r}"
    for name, kind in (("history", list), ("nonfinite_events", list), ("epoch_totals", dict)):
        if not isinstance(training.get(name, kind()), kind):
            return f"{name} must be a JSON {kind.__name__}"
    totals = training.get("epoch_totals", {})
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in totals.values()):
        return "epoch_totals must hold numbers"
    scale = training.get("lr_scale", 1.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not 0 < scale <= 1:
        return f"lr_scale must be a number in (0, 1], got {scale!r}"
    return None


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or RunError naming the file."""
    try:
        value = read_json(path)
    except FileNotFoundError:
        raise RunError(f"{path}: missing; the checkpoint is incomplete") from None
    except DataError as error:
        raise RunError(str(error)) from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
