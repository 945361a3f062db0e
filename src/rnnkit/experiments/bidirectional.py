"""Unidirectional against bidirectional RNNs on tagging that needs the left or both contexts.

Claim (Schuster & Paliwal 1997; Graves & Schmidhuber 2005): a bidirectional RNN helps when the
label at a position depends on what comes after it, and brings nothing essential when the
label depends on the past only.

Data (`tasks.context_tagging`): random tokens from C symbols, length T; two tagging tasks:
"left" tags t with (x[t-2] + x[t-1]) mod C, "both sides" with (x[t-2] + x[t+2]) mod C. Since
x[t+2] is uniform and independent of the past, a left-to-right model can do no better than
chance (1/C) on "both sides". Fresh batches from a seeded generator; held-out evaluation batch.
Models: rnnkit LSTM, `layers` layers, hidden H per direction, linear readout of every step
(a bidirectional model has twice the recurrent parameters at the same H; the counts are listed).
Budget: the same Adam updates, batch, learning rate and clipping for every model.
Measurement: per-token held-out accuracy against chance 1/C and against the best a left-to-right
model can do (chance, except at the last positions, whose future tokens are padding zeros).
Real data: scikit-learn's 8x8 handwritten digits read row by row (8 steps of 8 pixels,
`rnnkit.data.load_digit_sequences`), 10 classes, a fixed random split of 500 held-out images;
the bidirectional classifier reads the final state of each direction. Chance there is the
share of the most common class.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from rnnkit.data.digits import load_digit_sequences
from rnnkit.experiments import reporting
from rnnkit.experiments.networks import RecurrentReadout, parameter_count
from rnnkit.experiments.tasks import context_tagging
from rnnkit.experiments.training import train

TASKS = {"left": (-2, -1), "both sides": (-2, 2)}
TASK_NAMES = (*TASKS, "digits")
DIGITS_HELD_OUT = 500
DIGIT_CLASSES = 10


@dataclass(frozen=True)
class Config:
    """Sizes and budget; `CONFIGS` holds the full, quick and smoke variants."""

    length: int = 20
    classes: int = 4
    hidden_size: int = 32
    layers: int = 2
    batch: int = 64
    updates: int = 600
    learning_rate: float = 1e-2
    clip_norm: float = 1.0
    eval_batch: int = 512
    seed: int = 0


CONFIGS = {
    "full": Config(),
    "quick": Config(updates=200, eval_batch=256),
    "smoke": Config(length=6, hidden_size=8, batch=4, updates=2, eval_batch=8),
}


def left_to_right_ceiling(offsets: tuple[int, ...], length: int, classes: int) -> float:
    """Best per-token accuracy of a model that sees only x[:t+1]: where a tag needs a future token
    inside the sequence it is a uniform guess; the last max(offset) positions see only padding."""
    future = max((offset for offset in offsets if offset > 0), default=0)
    known = length if future == 0 else future
    return (known + (length - known) / classes) / length


def _train_and_score(
    config, model: RecurrentReadout, next_batch, held_out: tuple, description: str
) -> dict:
    """Train with cross-entropy on batches from `next_batch`; held-out accuracy of the argmax."""

    def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    log = train(
        model,
        next_batch,
        loss_of,
        config.updates,
        config.learning_rate,
        config.clip_norm,
        description,
    )
    inputs, targets = held_out
    with torch.no_grad():
        accuracy = (model(inputs).argmax(-1) == targets).float().mean().item()
    return {
        "accuracy": accuracy,
        "parameters": parameter_count(model),
        "train_seconds": log.seconds,
        "losses": log.losses,
    }


def tagging_run(
    config, offsets: tuple[int, ...], bidirectional: bool, layers: int, description: str
) -> dict:
    """Train one LSTM tagger on one context-tagging task; held-out per-token accuracy."""
    torch.manual_seed(config.seed)
    model = RecurrentReadout(
        "LSTM",
        config.classes,
        config.hidden_size,
        config.classes,
        num_layers=layers,
        bidirectional=bidirectional,
        per_step=True,
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    held_out = context_tagging(
        config.eval_batch,
        config.length,
        offsets,
        config.classes,
        torch.Generator().manual_seed(config.seed + 10_000),
    )
    result = _train_and_score(
        config,
        model,
        lambda: context_tagging(config.batch, config.length, offsets, config.classes, generator),
        held_out,
        description,
    )
    result["chance_accuracy"] = 1 / config.classes
    result["left_to_right_ceiling"] = left_to_right_ceiling(offsets, config.length, config.classes)
    return result


def digits_run(config, bidirectional: bool, layers: int, description: str) -> dict:
    """Train one LSTM classifier on the 8x8 digits read row by row; held-out accuracy."""
    images, labels = load_digit_sequences()
    inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(config.seed))
    test, training = order[:DIGITS_HELD_OUT], order[DIGITS_HELD_OUT:]
    torch.manual_seed(config.seed)
    model = RecurrentReadout(
        "LSTM",
        inputs.size(-1),
        config.hidden_size,
        DIGIT_CLASSES,
        num_layers=layers,
        bidirectional=bidirectional,
    )
    generator = torch.Generator().manual_seed(config.seed + 1)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        rows = training[torch.randint(0, len(training), (config.batch,), generator=generator)]
        return inputs[rows], targets[rows]

    result = _train_and_score(config, model, next_batch, (inputs[test], targets[test]), description)
    result["chance_accuracy"] = (targets[test] == targets[test].mode().values).float().mean().item()
    result["left_to_right_ceiling"] = None
    return result


def task_run(config, task: str, bidirectional: bool, layers: int, description: str) -> dict:
    """One model on one task of `TASK_NAMES`."""
    if task == "digits":
        return digits_run(config, bidirectional, layers, description)
    return tagging_run(config, TASKS[task], bidirectional, layers, description)


def run(config: Config, out_dir: Path) -> dict:
    """Train uni and bi taggers on both tasks, plot; returns the results dict."""
    start = time.perf_counter()
    results = {"experiment": "bidirectional", "config": asdict(config), "seed": config.seed}
    results["tasks"] = {
        task: {
            direction: task_run(
                config,
                task,
                direction == "bidirectional",
                config.layers,
                f"{task} {direction}",
            )
            for direction in ("unidirectional", "bidirectional")
        }
        for task in TASK_NAMES
    }
    _plot(results, config, out_dir / "bidirectional.png")
    results["seconds"] = time.perf_counter() - start
    results["machine"] = reporting.machine()
    return results


def _plot(results: dict, config: Config, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for offset, direction in enumerate(("unidirectional", "bidirectional")):
        values = [results["tasks"][task][direction]["accuracy"] for task in TASK_NAMES]
        positions = [i + 0.4 * offset for i in range(len(TASK_NAMES))]
        axis.bar(positions, values, width=0.4, label=direction)
    axis.axhline(1 / config.classes, color="grey", linestyle="--", label="tagging chance")
    axis.set_xticks([i + 0.2 for i in range(len(TASK_NAMES))], list(TASK_NAMES))
    axis.set(ylim=(0, 1.02), ylabel="held-out per-token accuracy")
    axis.set_title(f"{config.layers}-layer LSTM, H={config.hidden_size}, T={config.length}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    reporting.save_figure(figure, path)


def report(results: dict, out_dir: Path) -> None:
    """Write report.md and results.json and print the table."""
    config = results["config"]
    rows = [
        [
            task,
            f"{TASKS[task]}" if task in TASKS else "row by row",
            direction,
            row["parameters"],
            row["accuracy"],
            row["chance_accuracy"],
            "n/a" if row["left_to_right_ceiling"] is None else row["left_to_right_ceiling"],
        ]
        for task, directions in results["tasks"].items()
        for direction, row in directions.items()
    ]
    sections = [
        __doc__.split("\n\n")[1],
        f"Budget: {config['updates']} Adam updates, batch {config['batch']}, lr "
        f"{config['learning_rate']:g}, clip {config['clip_norm']:g}; T={config['length']}, "
        f"C={config['classes']}, {config['layers']} layers, H={config['hidden_size']}.",
        reporting.markdown_table(
            [
                "task",
                "offsets",
                "model",
                "parameters",
                "accuracy",
                "chance",
                "best left-to-right",
            ],
            rows,
        ),
        "![bidirectional](bidirectional.png)",
    ]
    reporting.write_report(out_dir, "Unidirectional vs bidirectional", sections, results)
