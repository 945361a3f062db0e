"""Experiments that test the classic claims about recurrent networks.

Each experiment is one module that reads like a method section (data, model, budget,
measurement, plot) and exposes `CONFIGS` ("full", "quick", "smoke"), `run(config, out_dir)` and
`report(results, out_dir)`. `run_experiment` is what the command line calls.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

EXPERIMENTS = (
    "vanishing",
    "memory",
    "lstm-vs-gru",
    "rnn-vs-transformer",
    "bidirectional",
    "depth",
)
MODES = ("full", "quick", "smoke")


def _module(name: str):
    return importlib.import_module(f"rnnkit.experiments.{name.replace('-', '_')}")


def run_experiment(name: str, quick: bool, out_dir: Path, *, smoke: bool = False) -> dict:
    """Run one experiment; write report.md, results.json and PNGs to out_dir; return the results.

    `quick` is the variant that finishes in minutes on 2 CPU cores; `smoke` (tests only) runs
    tiny sizes in seconds and overrides `quick`. Runs use one torch thread, restored afterwards.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"run_experiment: name must be one of {EXPERIMENTS}, got {name!r}")
    mode = "smoke" if smoke else "quick" if quick else "full"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = _module(name)
    # The models here are small (hidden sizes up to 128): a second torch thread costs more in
    # synchronisation than it gains, and on a shared 2-core machine it made runs many times slower.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = module.run(module.CONFIGS[mode], out_dir)
        results["mode"] = mode
        module.report(results, out_dir)
    finally:
        torch.set_num_threads(threads_before)
    return results


__all__ = ["EXPERIMENTS", "MODES", "run_experiment"]
