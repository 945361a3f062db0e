"""LSTM against GRU: parameters, speed and accuracy under the same budget.

Claim (Cho et al. 2014; Chung et al. 2014; Jozefowicz et al. 2015): the GRU has a quarter fewer
parameters than the LSTM at the same hidden size (3 gate blocks instead of 4), is correspondingly
faster, and reaches comparable accuracy; neither dominates across tasks.

Parameters: counted from the rnnkit modules at several hidden sizes, input size I.
Speed: one layer at shape (B, T, I, H), the layer's default backend (the fused CPU kernel where
it exists, else the reference loop); median wall time of a training step (forward + backward of
the summed outputs) and of an inference forward pass under no_grad, after one warm-up call.
Accuracy: the adding problem and the copy task of `memory` (the application tasks do not exist
yet), the same hidden size, updates, batch, learning rate and clipping for both cells.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import rnnkit
from rnnkit.experiments import memory, reporting
from rnnkit.experiments.networks import CELLS, parameter_count
from rnnkit.experiments.tasks import copy_chance_cross_entropy
from rnnkit.experiments.training import median_ms

COMPARED = ("LSTM", "GRU")


@dataclass(frozen=True)
class Config:
    """Sizes and budget; `CONFIGS` holds the full, quick and smoke variants."""

    input_size: int = 64
    count_hidden_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    speed_shape: tuple[int, int, int, int] = (32, 100, 64, 128)  # B, T, I, H
    speed_repeats: int = 10
    adding_length: int = 100
    copy_delay: int = 50
    hidden_size: int = 64
    batch: int = 128
    updates: int = 2000
    learning_rate: float = 1e-2
    clip_norm: float = 1.0
    eval_batch: int = 512
    seed: int = 0
    training_backend: str = "reference"  # see memory.Config.backend; the speed table uses "auto"


CONFIGS = {
    # 500 updates (not 2000) so that the documented full run fits in about 15 minutes on 2 shared
    # cores.
    "full": Config(updates=500),
    "quick": Config(speed_repeats=5, adding_length=50, copy_delay=10, updates=250, eval_batch=256),
    "smoke": Config(
        count_hidden_sizes=(8,),
        speed_shape=(2, 5, 4, 8),
        speed_repeats=1,
        adding_length=4,
        copy_delay=3,
        hidden_size=8,
        batch=4,
        updates=2,
        eval_batch=16,
    ),
}


def speed(cell: str, shape: tuple[int, int, int, int], repeats: int, seed: int) -> dict:
    """Median ms of a training step and of an inference pass of one layer at (B, T, I, H)."""
    batch, steps, inputs, hidden = shape
    torch.manual_seed(seed)
    layer = CELLS[cell](inputs, hidden, batch_first=True)
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


def run(config: Config, out_dir: Path) -> dict:
    """Count, time and train both cells, plot; returns the results dict."""
    start = time.perf_counter()
    results = {"experiment": "lstm-vs-gru", "config": asdict(config), "seed": config.seed}
    results["parameters"] = {
        str(hidden): {
            cell: parameter_count(CELLS[cell](config.input_size, hidden)) for cell in COMPARED
        }
        for hidden in config.count_hidden_sizes
    }
    results["speed"] = {
        cell: speed(cell, config.speed_shape, config.speed_repeats, config.seed)
        for cell in COMPARED
    }
    budget = memory.Config(
        lengths=(),
        cells=COMPARED,
        hidden_size=config.hidden_size,
        batch=config.batch,
        updates=config.updates,
        learning_rate=config.learning_rate,
        clip_norm=config.clip_norm,
        eval_batch=config.eval_batch,
        seed=config.seed,
        backend=config.training_backend,
    )
    results["adding"] = {
        cell: memory.adding_cell(cell, config.adding_length, budget) for cell in COMPARED
    }
    results["copy"] = {cell: memory.copy_cell(cell, config.copy_delay, budget) for cell in COMPARED}
    for cell in COMPARED:
        results["adding"][cell]["parameters"] = parameter_count(CELLS[cell](2, config.hidden_size))
    _plot(results, config, out_dir / "lstm_vs_gru.png")
    results["seconds"] = time.perf_counter() - start
    results["machine"] = reporting.machine()
    return results


def _plot(results: dict, config: Config, path: Path) -> None:
    figure, (speed_axis, adding_axis, copy_axis) = plt.subplots(1, 3, figsize=(12, 3.6))
    colours = {"LSTM": "tab:blue", "GRU": "tab:green"}
    positions = range(2)
    for offset, cell in enumerate(COMPARED):
        timings = results["speed"][cell]
        speed_axis.bar(
            [p + 0.4 * offset for p in positions],
            [timings["train_ms"], timings["inference_ms"]],
            width=0.4,
            color=colours[cell],
            label=cell,
        )
        adding_axis.semilogy(results["adding"][cell]["losses"], color=colours[cell], label=cell)
        copy_axis.semilogy(results["copy"][cell]["losses"], color=colours[cell], label=cell)
    batch, steps, inputs, hidden = config.speed_shape
    speed_axis.set_xticks([0.2, 1.2], ["training step", "inference"])
    speed_axis.set(ylabel="ms (median)", title=f"B={batch} T={steps} I={inputs} H={hidden}")
    adding_axis.axhline(1 / 6, color="grey", linestyle="--", label="baseline 1/6")
    adding_axis.set(
        xlabel="update", ylabel="training MSE", title=f"adding T={config.adding_length}"
    )
    chance = copy_chance_cross_entropy(config.copy_delay)
    copy_axis.axhline(chance, color="grey", linestyle="--", label="chance CE")
    copy_axis.set(xlabel="update", ylabel="training CE", title=f"copy delay {config.copy_delay}")
    for axis in (speed_axis, adding_axis, copy_axis):
        axis.legend(fontsize=7)
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
        [cell, timings["train_ms"], timings["inference_ms"], timings["backend"]]
        for cell, timings in results["speed"].items()
    ]
    accuracy_rows = [
        [
            cell,
            results["adding"][cell]["parameters"],
            results["adding"][cell]["mse"],
            results["adding"][cell]["baseline_mse"],
            results["copy"][cell]["recall_accuracy"],
            results["copy"][cell]["cross_entropy"],
            results["copy"][cell]["chance_cross_entropy"],
        ]
        for cell in COMPARED
    ]
    batch, steps, inputs, hidden = config["speed_shape"]
    sections = [
        __doc__.split("\n\n")[1],
        f"## Parameters (input size {config['input_size']}, one layer)\n\n"
        + reporting.markdown_table(["H", "LSTM", "GRU", "GRU / LSTM"], count_rows),
        f"## Speed at B={batch}, T={steps}, I={inputs}, H={hidden} "
        f"(median of {config['speed_repeats']})\n\n"
        + reporting.markdown_table(
            ["cell", "train step ms", "inference ms", "backend"], speed_rows
        ),
        f"## Accuracy, same budget ({config['updates']} Adam updates, batch {config['batch']}, "
        f"H={config['hidden_size']}, layer backend {config.get('training_backend', 'auto')})\n\n"
        + reporting.markdown_table(
            [
                "cell",
                "params (adding)",
                f"adding T={config['adding_length']} MSE",
                "baseline MSE",
                f"copy delay {config['copy_delay']} recall acc.",
                "copy CE",
                "chance CE",
            ],
            accuracy_rows,
        ),
        "![LSTM vs GRU](lstm_vs_gru.png)",
    ]
    reporting.write_report(out_dir, "LSTM vs GRU", sections, results)
