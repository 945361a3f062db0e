"""Depth: 1, 2 and 3 stacked LSTM layers on the context-tagging tasks of `bidirectional`.

Claim (Graves et al. 2013; Pascanu et al. 2014): stacking recurrent layers helps, because each
layer can build on the features of the one below.

Data: `tasks.context_tagging` as in the bidirectional experiment: "left" context (x[t-2] +
x[t-1]) mod C for unidirectional stacks, "both sides" (x[t-2] + x[t+2]) mod C for
bidirectional stacks. With one bidirectional layer and a linear readout, the two directions
meet only in the linear readout, which cannot form a sum modulo C of a past and a future token;
a second layer can. A single unidirectional layer can already form the left-context sum in its
recurrence. Real data: the 8x8 digits read row by row, as in the bidirectional experiment.
Models: rnnkit LSTM with 1, 2, 3 layers, hidden H per direction, linear readout of every step.
Budget: the same Adam updates, batch, learning rate and clipping for every depth.
Measurement: held-out accuracy (per token; per image for the digits) against chance, parameter
counts, training time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from rnnkit.experiments import reporting
from rnnkit.experiments.bidirectional import task_run

SETTINGS = {
    "unidirectional, left": ("left", False),
    "bidirectional, both sides": ("both sides", True),
    "unidirectional, digits": ("digits", False),
}


@dataclass(frozen=True)
class Config:
    """Sizes and budget; `CONFIGS` holds the full, quick and smoke variants."""

    depths: tuple[int, ...] = (1, 2, 3)
    length: int = 20
    classes: int = 4
    hidden_size: int = 32
    batch: int = 64
    updates: int = 600
    learning_rate: float = 1e-2
    clip_norm: float = 1.0
    eval_batch: int = 512
    seed: int = 0


CONFIGS = {
    "full": Config(),
    "quick": Config(updates=200, eval_batch=256),
    "smoke": Config(depths=(1, 2), length=6, hidden_size=8, batch=4, updates=2, eval_batch=8),
}


def run(config: Config, out_dir: Path) -> dict:
    """Train every (setting, depth), plot; returns the results dict."""
    start = time.perf_counter()
    results = {"experiment": "depth", "config": asdict(config), "seed": config.seed}
    results["settings"] = {
        setting: {
            str(depth): task_run(config, task, bidirectional, depth, f"{setting} {depth} layers")
            for depth in config.depths
        }
        for setting, (task, bidirectional) in SETTINGS.items()
    }
    _plot(results, config, out_dir / "depth.png")
    results["seconds"] = time.perf_counter() - start
    results["machine"] = reporting.machine()
    return results


def _plot(results: dict, config: Config, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for setting, depths in results["settings"].items():
        axis.plot(
            list(config.depths),
            [depths[str(d)]["accuracy"] for d in config.depths],
            marker="o",
            label=setting,
        )
    axis.axhline(1 / config.classes, color="grey", linestyle="--", label="tagging chance")
    axis.set_xticks(list(config.depths))
    axis.set(xlabel="stacked layers", ylabel="held-out per-token accuracy", ylim=(0, 1.02))
    axis.set_title(f"LSTM, H={config.hidden_size}, T={config.length}, {config.updates} updates")
    axis.legend(fontsize=7)
    figure.tight_layout()
    reporting.save_figure(figure, path)


def report(results: dict, out_dir: Path) -> None:
    """Write report.md and results.json and print the table."""
    config = results["config"]
    rows = [
        [
            setting,
            depth,
            row["parameters"],
            row["accuracy"],
            row["chance_accuracy"],
            row["train_seconds"],
        ]
        for setting, depths in results["settings"].items()
        for depth, row in depths.items()
    ]
    sections = [
        __doc__.split("\n\n")[1],
        f"Budget: {config['updates']} Adam updates, batch {config['batch']}, lr "
        f"{config['learning_rate']:g}, clip {config['clip_norm']:g}; T={config['length']}, "
        f"C={config['classes']}, H={config['hidden_size']}.",
        reporting.markdown_table(
            ["setting", "layers", "parameters", "accuracy", "chance", "train s"], rows
        ),
        "![depth](depth.png)",
    ]
    reporting.write_report(out_dir, "Depth: 1 vs 2 vs 3 layers", sections, results)
