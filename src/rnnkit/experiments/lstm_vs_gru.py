"""LSTM against GRU: parameters, speed and accuracy on two shipped application tasks.

Claim (Cho et al. 2014; Chung et al. 2014; Jozefowicz et al. 2015): the GRU has a quarter fewer
parameters than the LSTM at the same hidden size (3 gate blocks instead of 4), is correspondingly
faster, and reaches comparable accuracy; neither dominates across tasks.

Parameters: counted from the rnnkit layers at several hidden sizes, input size I, and from the
two task models.
Speed: one layer at shape (B, T, I, H); median wall time of a training step (forward + backward
of the summed outputs) and of an inference pass under no_grad, after one warm-up call; three
conditions: the default backend (fused CPU kernels) with the BLAS thread pools as installed,
the same with the BLAS pools limited to one thread, and the reference loop. The fused kernels
call torch's MKL, which follows torch's thread count, or where it is missing (or with
RNNKIT_CPU_BLAS=openblas) numpy's OpenBLAS, whose own pool does not (`kernels/cpu/blas.py`).
Accuracy: the applications' own data, models and `Trainer` (`rnnkit.train.classify` and
`rnnkit.train.lm`), nothing trained differently here: surname -> language classification
(shipped surnames, 10 languages, seeded 80/10/10 split, test accuracy against the majority
class) and character-level Shakespeare (shipped plays, contiguous 90/5/5 split, test bits per
character against an add-one unigram model). Each application's defaults (embedding, dropout,
learning rate, warmup and cosine schedule, clipping, best-on-validation weights), except: the
same hidden size for both cells, a fixed number of updates with early stopping off, and each
seed in `seeds` both initialises the model and seeds the application's split and batches, so
LSTM and GRU see the same data under each seed. Training speed on the tasks: median wall time
of one update; inference: wall time of the test pass. Both use the default backend with the
BLAS pools limited to `training_blas_threads`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import rnnkit
from rnnkit.experiments import reporting
from rnnkit.experiments.networks import CELLS, parameter_count
from rnnkit.experiments.training import median_ms
from rnnkit.train import classify, lm
from rnnkit.train.metrics import majority_class_baseline
from rnnkit.train.settings import Settings
from rnnkit.train.trainer import Trainer

COMPARED = ("LSTM", "GRU")
TASKS = {
    "surnames": {"metric": "accuracy", "higher_is_better": True, "baseline": "majority class"},
    "shakespeare": {"metric": "bits_per_char", "higher_is_better": False, "baseline": "unigram"},
}
# (name, layer backend, BLAS thread limit; None keeps the pools as installed)
SPEED_CONDITIONS = (
    ("fused, BLAS as installed", "auto", None),
    ("fused, BLAS 1 thread", "auto", 1),
    ("reference loop", "reference", None),
)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Config:
    """Sizes and budget; `CONFIGS` holds the full, quick and smoke variants."""

    input_size: int = 64
    count_hidden_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    speed_shape: tuple[int, int, int, int] = (32, 100, 64, 128)  # B, T, I, H
    speed_repeats: int = 10
    hidden_size: int = 128
    surname_updates: int = 1200  # 7.5 epochs of the 5,138 training names at batch 32
    text_updates: int = 800  # 1.6 epochs of 32 streams x 64 characters
    batch_size: int = 32
    seq_len: int = 64
    training_blas_threads: int = 1
    seed: int = 0
    repeats: int = 3  # seeds seed, seed + 1, ...

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds of the repeats: seed, seed + 1, ..."""
        return tuple(range(self.seed, self.seed + self.repeats))


CONFIGS = {
    # Sized for about 15 minutes on 2 shared cores (3 seeds x 2 cells x 2 tasks): measured 834 s
    # wall, 228 s of CPU, at load average 8 to 14; the quick run 98 s.
    "full": Config(),
    "quick": Config(speed_repeats=3, surname_updates=400, text_updates=200, repeats=1),
    "smoke": Config(
        count_hidden_sizes=(8,),
        speed_shape=(2, 5, 4, 8),
        speed_repeats=1,
        hidden_size=8,
        surname_updates=2,
        text_updates=2,
        batch_size=4,
        seq_len=8,
        repeats=2,
    ),
}


@contextmanager
def blas_threads(limit: int | None) -> Iterator[None]:
    """Limit the BLAS thread pools (OpenBLAS, MKL) to `limit` threads inside; None: as installed."""
    if limit is None:
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def installed_blas_threads() -> dict[str, int]:
    """Thread count of each loaded BLAS library, by file name."""
    pools = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    return {Path(pool["filepath"]).name: pool["num_threads"] for pool in pools}


def speed(cell: str, shape: tuple[int, int, int, int], repeats: int, backend: str) -> dict:
    """Median ms of a training step and of an inference pass of one layer at (B, T, I, H)."""
    batch, steps, inputs, hidden = shape
    torch.manual_seed(0)
    layer = CELLS[cell](inputs, hidden, batch_first=True, backend=backend)
    x = torch.randn(batch, steps, inputs)

    def training_step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x)[0].sum().backward()

    def inference() -> None:
        with torch.no_grad():
            layer(x)

    return {
        "train_ms": median_ms(training_step, repeats),
        "inference_ms": median_ms(inference, repeats),
        "backend": rnnkit.explain_backend(layer, x),
    }


def application_settings(task: str, cell: str, seed: int, config: Config) -> Settings:
    """The application's settings for one cell and seed under this experiment's budget."""
    shared = {
        "cell": cell.lower(),
        "hidden": config.hidden_size,
        "batch_size": config.batch_size,
        "seed": seed,
        "epochs": 10_000,  # the update count below is the budget
        "patience": None,
        "checkpoint_every": None,
    }
    if task == "surnames":
        return classify.ClassifySettings(max_steps=config.surname_updates, **shared)
    return lm.LanguageModelSettings(max_steps=config.text_updates, seq_len=config.seq_len, **shared)


def held_out_figures(task: str, prepared) -> tuple[dict, float]:
    """The task's test metrics of the trained model, and its baseline's value."""
    if task == "surnames":
        classes = len(prepared.state["classes"])
        metrics, _ = classify.evaluate_examples(prepared.model, prepared.test, CPU, classes)
        baseline = majority_class_baseline(
            prepared.task.train.labels, prepared.test.labels, classes
        )
        return metrics, baseline["accuracy"]
    bpc = lm.held_out_bits_per_char(prepared.model, prepared.test_ids, CPU)
    baseline = lm.unigram_baseline(prepared.task.train_ids, prepared.test_ids, len(prepared.vocab))
    return {"bits_per_char": bpc}, baseline


def train_on_task(task: str, cell: str, seed: int, config: Config) -> dict:
    """Train one cell on one application task with that application's Trainer; test figures."""
    application = classify if task == "surnames" else lm
    settings = application_settings(task, cell, seed, config)
    torch.manual_seed(seed)
    prepared = application.prepare(settings, None, CPU)
    step_ends: list[float] = []
    trainer = Trainer(
        prepared.model,
        prepared.task,
        settings.trainer_config(progress=False),
        on_step=lambda _trainer, _step: step_ends.append(time.perf_counter()),
    )
    state = trainer.fit()
    start = time.perf_counter()
    test, baseline = held_out_figures(task, prepared)
    test_seconds = time.perf_counter() - start
    # A median, so that the first steps (JIT compilation) and those with an evaluation do not count.
    intervals = [later - earlier for earlier, later in zip(step_ends, step_ends[1:])]
    return {
        "seed": seed,
        "test": test,
        "baseline": baseline,
        "parameters": parameter_count(prepared.model),
        "steps": state.step,
        "best_step": state.best_step,
        "best_valid": state.best_metric,
        "train_ms_per_step": 1e3 * statistics.median(intervals) if intervals else float("nan"),
        "test_seconds": test_seconds,
    }


def summarise(runs: list[dict], metric: str) -> dict:
    """Mean and sample standard deviation over seeds of the metric, and the medians of times."""
    values = [run["test"][metric] for run in runs]
    return {
        "runs": runs,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "parameters": runs[0]["parameters"],
        "train_ms_per_step": statistics.median(run["train_ms_per_step"] for run in runs),
        "test_seconds": statistics.median(run["test_seconds"] for run in runs),
    }


def run(config: Config, out_dir: Path) -> dict:
    """Count, time and train both cells on both tasks, plot; returns the results dict."""
    start = time.perf_counter()
    results = {
        "experiment": "lstm-vs-gru",
        "config": {**asdict(config), "seeds": list(config.seeds)},
        "seed": config.seed,
        "blas_threads_installed": installed_blas_threads(),
    }
    results["parameters"] = {
        str(hidden): {
            cell: parameter_count(CELLS[cell](config.input_size, hidden)) for cell in COMPARED
        }
        for hidden in config.count_hidden_sizes
    }
    results["speed"] = {}
    for name, backend, limit in SPEED_CONDITIONS:
        with blas_threads(limit):
            results["speed"][name] = {
                cell: speed(cell, config.speed_shape, config.speed_repeats, backend)
                for cell in COMPARED
            }
    results["tasks"] = {}
    with blas_threads(config.training_blas_threads):
        for task, about in TASKS.items():
            cells = {
                cell: summarise(
                    [train_on_task(task, cell, seed, config) for seed in config.seeds],
                    about["metric"],
                )
                for cell in COMPARED
            }
            results["tasks"][task] = {**about, "cells": cells}
    _plot(results, config, out_dir / "lstm_vs_gru.png")
    results["seconds"] = time.perf_counter() - start
    results["machine"] = reporting.machine()
    return results


def _plot(results: dict, config: Config, path: Path) -> None:
    figure, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    colours = {"LSTM": "tab:blue", "GRU": "tab:green"}
    batch, steps, _, hidden = config.speed_shape
    conditions = [name for name, _, _ in SPEED_CONDITIONS]
    for axis, kind in zip(axes[:2], ("train", "inference")):
        for offset, cell in enumerate(COMPARED):
            values = [results["speed"][name][cell][f"{kind}_ms"] for name in conditions]
            positions = [i + 0.4 * offset for i in range(len(conditions))]
            axis.bar(positions, values, width=0.4, color=colours[cell], label=cell)
        times = [
            results["speed"][name][cell][f"{kind}_ms"] for name in conditions for cell in COMPARED
        ]
        # A log scale only when one time dwarfs the others; otherwise bars start at zero.
        scale = "log" if max(times) > 10 * min(times) else "linear"
        axis.set_yscale(scale)
        labels = [name.replace(", ", "\n") for name in conditions]
        axis.set_xticks([i + 0.2 for i in range(len(conditions))], labels, fontsize=7)
        title = "training step" if kind == "train" else "inference"
        axis.set(
            ylabel=f"ms (median, {scale} scale)", title=f"{title}, B={batch} T={steps} H={hidden}"
        )
        axis.legend(fontsize=7)
    for axis, (task, outcome) in zip(axes[2:], results["tasks"].items()):
        for position, cell in enumerate(COMPARED):
            summary = outcome["cells"][cell]
            values = [run["test"][outcome["metric"]] for run in summary["runs"]]
            axis.plot([position] * len(values), values, "o", color=colours[cell], alpha=0.6)
            axis.plot(position, summary["mean"], "_", color=colours[cell], markersize=30)
        # Trained cells sit far from the baseline; drawn, it would flatten their difference.
        baseline = statistics.fmean(run["baseline"] for run in outcome["cells"]["LSTM"]["runs"])
        axis.set_xticks(range(len(COMPARED)), list(COMPARED))
        axis.set_xlim(-0.6, len(COMPARED) - 0.4)
        axis.margins(y=0.3)
        better = "higher" if outcome["higher_is_better"] else "lower"
        axis.set(
            ylabel=f"test {outcome['metric']} ({better} is better)",
            title=f"{task}, H={config.hidden_size}: seeds (o), mean (-)\n"
            f"{outcome['baseline']} baseline: {baseline:.3g}",
        )
    figure.tight_layout()
    reporting.save_figure(figure, path)


def report(results: dict, out_dir: Path) -> None:
    """Write report.md and results.json and print the tables."""
    config = results["config"]
    count_rows = [
        [hidden, counts["LSTM"], counts["GRU"], counts["GRU"] / counts["LSTM"]]
        for hidden, counts in results["parameters"].items()
    ]
    speed_rows = [
        [name, cell, timings["train_ms"], timings["inference_ms"], timings["backend"]]
        for name, cells in results["speed"].items()
        for cell, timings in cells.items()
    ]
    task_rows = []
    for task, outcome in results["tasks"].items():
        for cell in COMPARED:
            summary = outcome["cells"][cell]
            per_seed = ", ".join(
                reporting.format_number(r["test"][outcome["metric"]]) for r in summary["runs"]
            )
            task_rows.append(
                [
                    task,
                    cell,
                    summary["parameters"],
                    f"{reporting.format_number(summary['mean'])} ± "
                    f"{reporting.format_number(summary['std'])}",
                    per_seed,
                    statistics.fmean(r["baseline"] for r in summary["runs"]),
                    summary["train_ms_per_step"],
                    summary["test_seconds"],
                ]
            )
    batch, steps, inputs, hidden = config["speed_shape"]
    seeds = ", ".join(str(seed) for seed in config["seeds"])
    sections = [
        __doc__.split("\n\n")[1],
        f"## Parameters (input size {config['input_size']}, one layer)\n\n"
        + reporting.markdown_table(["H", "LSTM", "GRU", "GRU / LSTM"], count_rows),
        f"## Speed of one layer at B={batch}, T={steps}, I={inputs}, H={hidden} "
        f"(median of {config['speed_repeats']})\n\n"
        f"BLAS pools as installed: {results['blas_threads_installed']} threads.\n\n"
        + reporting.markdown_table(
            ["condition", "cell", "train step ms", "inference ms", "backend"], speed_rows
        ),
        f"## Application tasks, same budget (H={config['hidden_size']}, batch "
        f"{config['batch_size']}; surnames {config['surname_updates']} updates, shakespeare "
        f"{config['text_updates']} updates of {config['seq_len']} characters; seeds {seeds}; "
        f"BLAS {config['training_blas_threads']} thread)\n\n"
        "Surnames: test accuracy (higher is better); shakespeare: test bits per character "
        "(lower is better). Mean ± sample standard deviation over seeds.\n\n"
        + reporting.markdown_table(
            [
                "task",
                "cell",
                "parameters",
                "test metric",
                "per seed",
                "baseline",
                "train ms / update",
                "test pass s",
            ],
            task_rows,
        ),
        "![LSTM vs GRU](lstm_vs_gru.png)",
    ]
    reporting.write_report(out_dir, "LSTM vs GRU", sections, results)
