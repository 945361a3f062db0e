"""Writing an experiment's outputs: report.md, results.json and PNG plots, each atomically."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import rnnkit  # noqa: E402
from rnnkit.io import atomic_path  # noqa: E402

_FILE_MODE = 0o644  # mkstemp creates 0600; results are meant to be read by others


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to `path` through a temporary file in the same folder and os.replace."""
    with atomic_path(path, mode=_FILE_MODE) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, results: dict) -> None:
    """results.json, with non-finite floats written as the strings "inf"/"nan"."""
    atomic_write_text(path, json.dumps(_json_safe(results), indent=2) + "\n")


def save_figure(figure: plt.Figure, path: Path) -> None:
    """Save a matplotlib figure as a small PNG, atomically, and close it."""
    try:
        with atomic_path(path, suffix=".png", mode=_FILE_MODE) as temporary:
            figure.savefig(temporary, dpi=80, bbox_inches="tight")
    finally:
        plt.close(figure)


def format_number(value) -> str:
    """Compact text for a table cell."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(format_number(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    """What ran the experiment: CPU count, torch threads, versions and the layers' backend."""
    probe = rnnkit.LSTM(2, 2)
    return {
        "backend": rnnkit.explain_backend(probe, torch.zeros(3, 1, 2)),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_report(out_dir: Path, title: str, sections: list[str], results: dict) -> None:
    """report.md (title, sections, machine) and results.json in out_dir; print the sections."""
    info = results["machine"]
    footer = (
        f"Mode: {results['mode']}; seed {results['seed']}; {results['seconds']:.1f} s on "
        f"{info['cpu_count']} CPU cores ({info['processor']}), torch {info['torch']} with "
        f"{info['torch_threads']} threads. Layer backend: {info['backend']}."
    )
    text = f"# {title}\n\n" + "\n\n".join(sections) + f"\n\n{footer}\n"
    atomic_write_text(out_dir / "report.md", text)
    write_json(out_dir / "results.json", results)
    print(text)
