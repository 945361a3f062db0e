"""Training runs end to end, and using finished runs: what the CLI calls.

`train_run` prepares the run directory, data and model, trains (resuming when asked, in one
process or under torchrun), then writes the model, metrics and plots. `load_run` rebuilds a
trained model from its directory for eval, predict, generate and forecast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

import rnnkit
from rnnkit.models import (
    Forecaster,
    ForecasterConfig,
    LanguageModel,
    LanguageModelConfig,
    SequenceClassifier,
    SequenceClassifierConfig,
    SequenceTagger,
    SequenceTaggerConfig,
)
from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnkit.train import classify, forecast, lm, music, tag
from rnnkit.train import seq2seq as seq2seq_task
from rnnkit.train.checkpoint import has_checkpoint
from rnnkit.train.distributed import setup_distributed, teardown_distributed
from rnnkit.train.io import atomic_write_json, read_json
from rnnkit.train.plots import plot_learning_curves
from rnnkit.train.rundir import (
    RunError,
    default_run_dir,
    load_model_weights,
    prepare_run_dir,
    read_config,
    save_model,
    write_config,
)
from rnnkit.train.settings import Settings
from rnnkit.train.trainer import Trainer

APPLICATIONS: dict[str, tuple[ModuleType, type[Settings]]] = {
    "classify": (classify, classify.ClassifySettings),
    "lm": (lm, lm.LanguageModelSettings),
    "forecast": (forecast, forecast.ForecastSettings),
    "music": (music, music.MusicSettings),
    "tag": (tag, tag.TagSettings),
    "seq2seq": (seq2seq_task, seq2seq_task.Seq2SeqSettings),
}
MODELS = {
    "SequenceClassifier": (SequenceClassifier, SequenceClassifierConfig),
    "LanguageModel": (LanguageModel, LanguageModelConfig),
    "Forecaster": (Forecaster, ForecasterConfig),
    "SequenceTagger": (SequenceTagger, SequenceTaggerConfig),
    "Seq2Seq": (Seq2Seq, Seq2SeqConfig),
}
PREPROCESSING_FILES = ("vocab.json", "preprocessing.json")
# Options that may change when a run is resumed: the budget, and what to do on NaN.
BUDGET_OPTIONS = ("epochs", "max_steps", "on_nan")
# What a corrupt or hand-edited config.json can make building its settings or model raise.
CONFIG_ERRORS = (TypeError, KeyError, ValueError, RuntimeError, OverflowError)


def make_settings(task: str, options: dict[str, Any]) -> Settings:
    """The task's settings from CLI options (None means the task's default)."""
    if task not in APPLICATIONS:
        raise RunError(f"task must be one of {tuple(APPLICATIONS)}, got {task!r}")
    settings_class = APPLICATIONS[task][1]
    known = {f.name for f in dataclasses.fields(settings_class)}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in known)
    if unknown:
        raise RunError(f"options {unknown} do not apply to `train {task}`")
    return settings_class(**{k: v for k, v in options.items() if v is not None})


def resumed_settings(task: str, config: dict[str, Any], options: dict[str, Any]) -> Settings:
    """The run's saved settings, with only the budget options taken from the command line."""
    if config["task"] != task:
        raise RunError(f"--resume: the run is a `train {config['task']}` run, not `train {task}`")
    saved = dict(config["settings"])
    for name, value in options.items():
        if value is None or name in BUDGET_OPTIONS:
            continue
        if name in saved and saved[name] != value:
            raise RunError(
                f"--resume: --{name.replace('_', '-')} {value} differs from the run's "
                f"{saved[name]}; only --epochs and --max-steps (and --on-nan) may change "
                "when resuming"
            )
    saved.update({k: options[k] for k in BUDGET_OPTIONS if options.get(k) is not None})
    try:
        return APPLICATIONS[task][1](**saved)
    except RunError:
        raise
    except CONFIG_ERRORS as error:
        raise RunError(f"--resume: config.json holds unusable settings ({error})") from None


def _barrier(enabled: bool) -> None:
    if enabled and dist.is_initialized():
        dist.barrier()


def train_run(
    task: str,
    options: dict[str, Any],
    out: str | Path | None = None,
    force: bool = False,
    resume: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run (or resume it) and return its summary (empty on non-main processes)."""
    application, _ = APPLICATIONS.get(task, (None, None))
    if application is None:
        raise RunError(f"task must be one of {tuple(APPLICATIONS)}, got {task!r}")
    context = setup_distributed()
    try:
        saved_files: dict[str, Any] = {}
        if resume is not None:
            run_dir = Path(resume)
            config = read_config(run_dir)
            settings = resumed_settings(task, config, options)
            if not has_checkpoint(run_dir / "checkpoint"):
                raise RunError(f"--resume {run_dir}: the run has no checkpoint/ to resume from")
            for name in PREPROCESSING_FILES:
                if (run_dir / name).is_file():
                    saved_files[name] = read_json(run_dir / name)
        else:
            settings = make_settings(task, options)
            run_dir = Path(out) if out is not None else default_run_dir(task)
            prepare_run_dir(run_dir, force, check_only=True)
        torch.manual_seed(settings.seed)
        saved = next(iter(saved_files.values()), None)
        prepared = application.prepare(settings, saved, context.device)
        if resume is None and context.is_main:
            prepare_run_dir(run_dir, force)
        _barrier(context.enabled)
        config = {
            "rnnkit_version": rnnkit.__version__,
            "task": task,
            "settings": dataclasses.asdict(settings),
            "model": application.model_config(prepared),
            "trainer": dataclasses.asdict(settings.trainer_config()),
            "world_size": context.world_size,
        }
        if context.is_main:
            write_config(run_dir, config)
            for name, value in prepared.files.items():
                atomic_write_json(run_dir / name, value)
        _barrier(context.enabled)
        trainer = Trainer(
            prepared.model,
            prepared.task,
            settings.trainer_config(progress),
            run_dir / "checkpoint",
            context,
        )
        if resume is not None:
            trainer.resume()
        state = trainer.fit()
        if not context.is_main:
            return {}
        results = application.finish(prepared, run_dir)
        save_model(run_dir, prepared.model.cpu())
        metric = prepared.task.metric
        plot_learning_curves(run_dir / "curves.png", state.history, metric)
        summary = {
            "task": task,
            "run_dir": str(run_dir),
            "steps": state.step,
            "stop_reason": state.stop_reason,
            "best_step": state.best_step,
            f"best_valid_{metric}": state.best_metric,
            "skipped_steps": state.skipped_steps,
            "clipped_steps": state.clipped_steps,
            "nonfinite_events": state.nonfinite_events,
            **results,
            "history": state.history,
        }
        atomic_write_json(run_dir / "metrics.json", summary)
        return summary
    finally:
        teardown_distributed(context)


@dataclass
class LoadedRun:
    """A trained run rebuilt from its directory."""

    run_dir: Path
    task: str
    settings: Settings
    model: torch.nn.Module
    state: dict[str, Any]


def load_run(run_dir: str | Path, expect: str | tuple[str, ...] | None = None) -> LoadedRun:
    """Rebuild a run's model from config.json + model.safetensors, and its preprocessing state.

    `expect` names the task (or tasks) the caller can use; another task is a RunError.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    task = config["task"]
    if task not in APPLICATIONS:
        raise RunError(f"{run_dir}: unknown task {task!r} in config.json")
    expected = (expect,) if isinstance(expect, str) else expect
    if expected is not None and task not in expected:
        wanted = " or ".join(f"`{name}`" for name in expected)
        raise RunError(f"{run_dir} is a `{task}` run; this command needs a {wanted} run")
    try:
        settings = APPLICATIONS[task][1](**config["settings"])
        model_class, config_class = MODELS[config["model"]["class"]]
        model = model_class(config_class(**config["model"]["config"]))
    except CONFIG_ERRORS as error:
        raise RunError(
            f"{run_dir / 'config.json'} does not describe a model rnnkit can build ({error})"
        ) from None
    load_model_weights(run_dir, model)
    state: dict[str, Any] = {}
    for name in PREPROCESSING_FILES:
        if (run_dir / name).is_file():
            state = read_json(run_dir / name)
    return LoadedRun(run_dir, task, settings, model, state)


def evaluate_run(run_dir: str | Path, data: str | None = None) -> dict[str, Any]:
    """The run's quality figures on its test split, or on all of `data`."""
    run = load_run(run_dir)
    application = APPLICATIONS[run.task][0]
    return {"task": run.task, **application.evaluate_run(run.model, run.state, run.settings, data)}
