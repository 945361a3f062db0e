"""The PNGs people look at: learning curves, confusion matrices, forecasts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rnnkit.train.io import atomic_save_figure


def plot_learning_curves(path: str | Path, history: Sequence[dict[str, Any]], metric: str) -> None:
    """Training loss and the validation metric per evaluation, against the step."""
    figure = Figure(figsize=(9, 3.6))
    loss_axes, metric_axes = figure.subplots(1, 2)
    steps = [record["step"] for record in history]
    loss_axes.plot(steps, [record["train_loss"] for record in history], marker="o")
    loss_axes.set(xlabel="step", ylabel="training loss (epoch mean)", title="training loss")
    key = f"valid_{metric}"
    metric_axes.plot(steps, [record.get(key, np.nan) for record in history], marker="o", color="C1")
    metric_axes.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
    atomic_save_figure(path, figure)


def plot_confusion_matrix(path: str | Path, matrix: np.ndarray, class_names: Sequence[str]) -> None:
    """(C, C) counts, rows = true class, as an annotated heat map."""
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, [str(n) for n in class_names], rotation=45, ha="right")
    axes.set_yticks(ticks, [str(n) for n in class_names])
    axes.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            color = "white" if matrix[i, j] > threshold else "black"
            axes.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    atomic_save_figure(path, figure)


def plot_forecast(
    path: str | Path,
    history: np.ndarray,
    forecasts: dict[str, np.ndarray],
    start: int,
    actual: np.ndarray | None = None,
    column: str = "value",
    title: str = "forecast",
    offset: int = 0,
) -> None:
    """(T,) history (time steps offset.. ), then (H,) forecasts (and actual values) from `start`."""
    figure = Figure(figsize=(9, 3.6))
    axes = figure.subplots()
    axes.plot(offset + np.arange(len(history)), history, color="black", label="observed")
    for index, (name, values) in enumerate(forecasts.items()):
        steps = np.arange(start, start + len(values))
        axes.plot(steps, values, marker=".", color=f"C{index}", label=name)
    if actual is not None:
        steps = np.arange(start, start + len(actual))
        axes.plot(steps, actual, color="grey", linestyle="--", label="actual")
    axes.axvline(start - 0.5, color="grey", alpha=0.4)
    axes.set(xlabel="time step", ylabel=column, title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    atomic_save_figure(path, figure)
