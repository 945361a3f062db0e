"""The run directory: what a finished run leaves behind, and guarding what already exists.

config.json          task, settings, model class and config: enough to rebuild the model
model.safetensors    the trained (best on validation) weights
vocab.json / preprocessing.json   what turns raw input into model input
metrics.json         per-epoch history, test figures, the baseline
curves.png           learning curves (+ confusion.png / forecast.png / sample.txt / sample.mid)
checkpoint/          the state to resume training exactly
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from rnnkit.train.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

RUN_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.json",
    "preprocessing.json",
    "metrics.json",
    "curves.png",
    "confusion.png",
    "forecast.png",
    "forecast_future.png",
    "sample.txt",
    "sample.mid",
    "checkpoint",
)


class RunError(ValueError):
    """A run directory or its options are unusable; the message says what to do instead."""


def default_run_dir(task: str) -> Path:
    """runs/<task>-<UTC time stamp>: a fresh directory for every run."""
    return Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def prepare_run_dir(out: Path, force: bool, check_only: bool = False) -> Path:
    """Create `out`; refuse a non-empty one (it may hold another run) unless `force`.

    With check_only, only raise if it would be refused (nothing is created or removed).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            what = "a run" if (out / "config.json").is_file() else "files"
            raise RunError(
                f"--out {out} already holds {what}; pass --resume {out} to continue it, "
                "--force to replace it, or choose another --out"
            )
        if check_only:
            return out
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """config.json, atomically."""
    atomic_write_json(Path(run_dir) / "config.json", config)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The config.json of a run directory; RunError if it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise RunError(f"{run_dir} is not an rnnkit run directory (no config.json)")
    try:
        config = read_json(path)
    except ValueError as error:
        raise RunError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or "task" not in config or "model" not in config:
        raise RunError(f"{path} does not describe an rnnkit run (no task/model)")
    return config


def save_model(run_dir: Path, model: torch.nn.Module) -> None:
    """model.safetensors, atomically."""
    atomic_save_tensors(Path(run_dir) / "model.safetensors", model.state_dict())


def load_model_weights(run_dir: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load model.safetensors into `model`; RunError if the run has no trained weights yet."""
    path = Path(run_dir) / "model.safetensors"
    if not path.is_file():
        raise RunError(
            f"{run_dir} has no model.safetensors (training did not finish); "
            f"continue it with: rnnkit train <task> --resume {run_dir}"
        )
    from rnnkit.train.checkpoint import check_weights  # checkpoint imports this module

    weights = load_tensors(path)
    check_weights(model, weights, str(path))
    model.load_state_dict(weights)
    model.eval()
    return model
