"""Sections of bench_variants.py for MinGRU, MinLSTM and IndRNN (run them from there).

    python benchmarks/bench_variants.py --sections min_scan,indrnn_min --threads 1 --timer cpu

indrnn_min: IndRNN, MinGRU and MinLSTM with backend="cpu" (fused numba kernel; MinGRU/MinLSTM in
mode="sequential", which is what backend="auto" runs on CPU) against the same
layer as a Python autograd loop of its step (IndRNN backend="reference"; MinGRU/MinLSTM
backend="reference", mode="sequential"; target: fused at least 5x faster on the training step)
and against torch.nn.LSTM of the same size, over bench_layers' configurations.

min_scan: MinGRU at (batch 1 and 8, input 64, hidden 128) and T = 256, 1024, 4096: the parallel
mode as rnnkit runs it on CPU (backend="auto": the fused kernels; in training a batch too small
to split over the threads is scanned in chunks of time, in inference the kernel projects the
input itself and such a batch is split by hidden units) and as the torch log-space scan
(backend="reference", torch.logcumsumexp), against the sequential mode's step loop
(backend="reference", target: parallel mode at least 10x faster at T = 4096) and the fused
sequential walk (backend="auto", mode="sequential"). Run it with torch's default threads and the
wall clock (`--sections min_scan --timer wall`): the threads are what the parts are for.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from bench_layers import reference_is_slow, step_functions, time_interleaved
from torch import nn
from tqdm import tqdm

import rnnkit

SCAN_STEPS = (256, 1024, 4096)
SCAN_SHAPES = ((1, 64, 128), (8, 64, 128))  # batch, input, hidden
VARIANTS = {"indrnn": rnnkit.IndRNN, "min_gru": rnnkit.MinGRU, "min_lstm": rnnkit.MinLSTM}


class _WithMode(nn.Module):
    """A MinGRU/MinLSTM layer called with a fixed mode, for bench_layers' step functions."""

    def __init__(self, layer: nn.Module, mode: str) -> None:
        super().__init__()
        self.layer, self.mode = layer, mode

    def forward(self, x):
        return self.layer(x, mode=self.mode)


def _geometric_mean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def time_rows(
    variant: str, config, layers: dict, repeats: int, timer: str, device: str = "cpu"
) -> list[dict]:
    """Inference and training rows: name -> layer timed, call by call in turn, on `device`."""
    batch, steps, input_size, _ = config
    torch.manual_seed(1)
    x = torch.randn(batch, steps, input_size, device=device)
    functions = {name: step_functions(layer.to(device), x) for name, layer in layers.items()}
    rows = []
    for mode in ("inference", "training"):
        timed = time_interleaved(
            {name: fns[mode] for name, fns in functions.items()}, repeats, device, timer
        )
        rows.append(
            {
                "variant": variant,
                "config": list(config),
                "mode": mode,
                "times": {k: v for k, v in timed.items() if isinstance(v, float)},
                "errors": {k: v for k, v in timed.items() if isinstance(v, str)},
            }
        )
    return rows


def _add_ratio(rows: list[dict], key: str, numerator: str, denominator: str) -> None:
    for row in rows:
        times = row["times"]
        if numerator in times and denominator in times:
            row[key] = times[numerator] / times[denominator]


def _means(rows: list[dict], variants, keys: list[str]) -> dict:
    summary = {}
    for variant in variants:
        for mode in ("inference", "training"):
            picked = [r for r in rows if r["variant"] == variant and r["mode"] == mode]
            summary[f"{variant} {mode}"] = {
                key: _geometric_mean([r[key] for r in picked if key in r]) for key in keys
            }
    return summary


def bench_indrnn_min(args: argparse.Namespace) -> dict:
    """Fused IndRNN / MinGRU / MinLSTM vs their autograd loops and vs torch.nn.LSTM."""
    rows = []
    # backend="cpu" on the CPU (the fused kernel or an error, never the loop); on CUDA "auto"
    # runs the GPU walk.
    fused_backend = "auto" if args.device == "cuda" else "cpu"
    jobs = [(variant, config) for variant in VARIANTS for config in args.config_list]
    for variant, config in tqdm(jobs, desc="indrnn_min", unit="config", file=sys.stderr):
        cls = VARIANTS[variant]
        _, _, input_size, hidden = config
        torch.manual_seed(0)
        fused = cls(input_size, hidden, batch_first=True, backend=fused_backend)
        timed_fused = fused if variant == "indrnn" else _WithMode(fused, "sequential")
        layers = {
            "fused": timed_fused,
            "torch.nn LSTM": nn.LSTM(input_size, hidden, batch_first=True),
        }
        if not reference_is_slow(config):
            loop = cls(input_size, hidden, batch_first=True, backend="reference")
            loop.load_state_dict(fused.state_dict())
            layers["autograd loop"] = loop if variant == "indrnn" else _WithMode(loop, "sequential")
        rows += time_rows(variant, config, layers, args.repeats, args.timer, args.device)
    _add_ratio(rows, "loop_over_fused", "autograd loop", "fused")
    _add_ratio(rows, "fused_over_torch", "fused", "torch.nn LSTM")
    return {
        "columns": ["fused", "autograd loop", "torch.nn LSTM"],
        "ratios": {
            "loop_over_fused": "autograd loop / fused (target >= 5 on training)",
            "fused_over_torch": "fused / torch.nn.LSTM of the same size (below 1: faster)",
        },
        "rows": rows,
        "geometric_means": _means(rows, VARIANTS, ["loop_over_fused", "fused_over_torch"]),
    }


def bench_min_scan(args: argparse.Namespace) -> dict:
    """MinGRU's parallel mode (fused CPU scan, torch log-space scan) vs its sequential step loop
    and the fused sequential walk."""
    steps_list = SCAN_STEPS[:2] if args.quick else SCAN_STEPS
    jobs = [(shape, steps) for shape in SCAN_SHAPES for steps in steps_list]
    rows = []
    for (batch, input_size, hidden), steps in tqdm(
        jobs, desc="min_scan", unit="config", file=sys.stderr
    ):
        torch.manual_seed(0)
        reference = rnnkit.MinGRU(input_size, hidden, batch_first=True, backend="reference")
        fused = rnnkit.MinGRU(input_size, hidden, batch_first=True, backend="auto")
        fused.load_state_dict(reference.state_dict())
        layers = {
            "fused parallel": _WithMode(fused, "parallel"),
            "log-space scan": _WithMode(reference, "parallel"),
            "step loop": _WithMode(reference, "sequential"),
            "fused sequential": _WithMode(fused, "sequential"),
        }
        # The step loop's training step takes seconds at T = 4096: fewer samples there.
        repeats = max(1, min(args.repeats, 3)) if steps >= 4096 else args.repeats
        config = (batch, steps, input_size, hidden)
        rows += time_rows("min_gru", config, layers, repeats, args.timer, args.device)
    _add_ratio(rows, "loop_over_parallel", "step loop", "fused parallel")
    _add_ratio(rows, "loop_over_scan", "step loop", "log-space scan")
    _add_ratio(rows, "sequential_over_parallel", "fused sequential", "fused parallel")
    return {
        "columns": ["fused parallel", "log-space scan", "step loop", "fused sequential"],
        "ratios": {
            "loop_over_parallel": "sequential step loop / parallel mode on the fused CPU "
            "kernels (backend='auto'; target >= 10 at T=4096)",
            "loop_over_scan": "sequential step loop / parallel log-space scan with "
            "torch.logcumsumexp (backend='reference')",
            "sequential_over_parallel": "fused sequential walk / fused parallel mode (above 1: "
            "the chunks of time pay; inference runs the same walk in both modes)",
        },
        "rows": rows,
        "geometric_means": {},
    }


SECTIONS = {"indrnn_min": bench_indrnn_min, "min_scan": bench_min_scan}
