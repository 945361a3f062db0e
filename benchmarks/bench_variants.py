"""Variant layers' speed: each fused variant against its Python autograd loop and torch.nn.

    python benchmarks/bench_variants.py [--sections layer_norm,regularized] [--configs 0,1] [--quick]
        [--repeats N] [--json PATH] [--threads N] [--timer wall|cpu] [--device cpu|cuda]

Each section is one function in SECTIONS that returns table rows; a row times one variant, one
(batch, steps, input, hidden) configuration and one mode (inference: forward under
torch.inference_mode; training: forward + backward of the sum of the outputs, gradients for the
parameters and the input), unidirectional, batch_first, zero initial state, float32. The
implementations take turns call by call so that machine noise hits them alike (bench_layers.py's
timer); the median of the repeats is reported.

layer_norm: LayerNormLSTM / LayerNormGRU with backend="cpu" (the fused kernel) against the same
layer with backend="reference" (the cell's step in a Python autograd loop; target: fused at least
5x faster on the training step, geometric mean) and against torch.nn.LSTM / torch.nn.GRU of the
same size (no layer norm; target: fused within 1.3x of it).

regularized: LSTM / GRU / RNN and LayerNormLSTM / LayerNormGRU in training mode with
recurrent_dropout=0.25 and zoneout=0.1, the fused kernels of rnnkit.kernels.cpu.regularized (and
layer_norm) against the same layers' autograd loop and against torch.nn's plain layer of the same
size (no regularisers, no layer norm), with the same two targets.

--device cuda times the same sections with backend="auto" on CUDA tensors (the Triton kernels of
rnnkit.kernels.gpu); a layer that "auto" leaves to the reference loop there gets the reason in
place of a fused time.

Prints a table per section, writes JSON; asserts no times.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import bench_minimal
import torch
from bench_layers import CONFIGS, QUICK_CONFIGS, machine_info, reference_is_slow, write_json
from bench_minimal import time_rows
from tqdm import tqdm

import rnnkit

DEFAULT_JSON = Path(__file__).parent / "results" / "variants-cpu.json"


def geometric_mean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# -- sections ----------------------------------------------------------------------------------
LAYER_NORM_VARIANTS = {
    "ln_lstm": (rnnkit.LayerNormLSTM, torch.nn.LSTM, {}),
    "ln_gru": (rnnkit.LayerNormGRU, torch.nn.GRU, {}),
}
# Recurrent dropout and zoneout in training mode (both timed modes draw masks: the layer trains).
REGULARIZERS = {"recurrent_dropout": 0.25, "zoneout": 0.1}
REGULARIZED_VARIANTS = {
    "reg_lstm": (rnnkit.LSTM, torch.nn.LSTM, REGULARIZERS),
    "reg_gru": (rnnkit.GRU, torch.nn.GRU, REGULARIZERS),
    "reg_rnn": (rnnkit.RNN, torch.nn.RNN, REGULARIZERS),
    "reg_ln_lstm": (rnnkit.LayerNormLSTM, torch.nn.LSTM, REGULARIZERS),
    "reg_ln_gru": (rnnkit.LayerNormGRU, torch.nn.GRU, REGULARIZERS),
}


def bench_against_loop_and_torch(variants: dict, args, name: str) -> dict:
    """Each fused variant vs the same layer on its autograd loop and vs torch.nn's plain layer."""
    rows = []
    # backend="cpu" on the CPU (the fused kernel or an error, never the loop); on CUDA "auto",
    # and a layer that "auto" would leave to the reference loop is reported, not timed.
    fused_backend = "auto" if args.device == "cuda" else "cpu"
    jobs = [(variant, config) for variant in variants for config in args.config_list]
    for variant, config in tqdm(jobs, desc=name, unit="config", file=sys.stderr):
        cls, torch_cls, options = variants[variant]
        _, _, input_size, hidden = config
        torch.manual_seed(0)
        fused = cls(input_size, hidden, batch_first=True, backend=fused_backend, **options)
        layers = {"fused": fused, "torch.nn": torch_cls(input_size, hidden, batch_first=True)}
        if not reference_is_slow(config):
            loop = cls(input_size, hidden, batch_first=True, backend="reference", **options)
            loop.load_state_dict(fused.state_dict())
            layers["autograd loop"] = loop
        reason = rnnkit.explain_backend(
            fused.to(args.device), torch.zeros(config[1], 1, input_size, device=args.device)
        )
        if args.device == "cuda" and not reason.startswith("auto: fused"):
            del layers["fused"]
        new_rows = time_rows(variant, config, layers, args.repeats, args.timer, args.device)
        for row in new_rows:
            if "fused" not in layers:
                row["errors"]["fused"] = f"not timed: {reason}"
        rows += new_rows
    for row in rows:
        times = row["times"]
        if "fused" in times:
            if "autograd loop" in times:
                row["loop_over_fused"] = times["autograd loop"] / times["fused"]
            if "torch.nn" in times:
                row["fused_over_torch"] = times["fused"] / times["torch.nn"]
    summary = {}
    for variant in variants:
        for mode in ("inference", "training"):
            picked = [r for r in rows if r["variant"] == variant and r["mode"] == mode]
            summary[f"{variant} {mode}"] = {
                key: geometric_mean([r[key] for r in picked if key in r])
                for key in ("loop_over_fused", "fused_over_torch")
            }
    return {
        "columns": ["fused", "autograd loop", "torch.nn"],
        "ratios": {
            "loop_over_fused": "autograd loop / fused (target >= 5 on training)",
            "fused_over_torch": "fused / torch.nn's plain layer of the same size (target <= 1.3)",
        },
        "rows": rows,
        "geometric_means": summary,
    }


def bench_layer_norm(args) -> dict:
    """Fused layer-normalised LSTM/GRU vs their autograd loop and vs torch.nn's LSTM/GRU."""
    return bench_against_loop_and_torch(LAYER_NORM_VARIANTS, args, "layer_norm")


def bench_regularized(args) -> dict:
    """LSTM/GRU/RNN with recurrent dropout and zoneout (training): fused vs loop vs torch.nn."""
    return bench_against_loop_and_torch(REGULARIZED_VARIANTS, args, "regularized")


# Each section: name -> function(args) -> {"columns", "ratios", "rows", "geometric_means"}.
# Other variants add their section here.
SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "layer_norm": bench_layer_norm,
    "regularized": bench_regularized,
    **bench_minimal.SECTIONS,  # indrnn_min, min_scan: see bench_minimal.py
}


# -- output ------------------------------------------------------------------------------------
def print_section(name: str, result: dict) -> None:
    columns, ratios = result["columns"], list(result["ratios"])
    header = f"{'variant':<11} {'B,T,I,H':<16} {'mode':<9} " + " ".join(
        f"{column + ' ms':>16}" for column in columns
    )
    header += " " + " ".join(f"{ratio:>18}" for ratio in ratios)
    print(f"\n[{name}]")
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        cells = []
        for column in columns:
            if column in row["times"]:
                cells.append(f"{row['times'][column] * 1e3:>16.3f}")
            else:
                cells.append(f"{'error' if column in row['errors'] else '-':>16}")
        ratio_cells = [
            f"{row[ratio]:>17.2f}x" if ratio in row else f"{'-':>18}" for ratio in ratios
        ]
        print(
            f"{row['variant']:<11} {','.join(map(str, row['config'])):<16} {row['mode']:<9} "
            + " ".join(cells)
            + " "
            + " ".join(ratio_cells)
        )
    for row in result["rows"]:
        for column, text in row["errors"].items():
            print(f"  error {row['variant']} {row['config']} {row['mode']} {column}: {text}")
    print("geometric means:")
    for key, values in result["geometric_means"].items():
        text = "  ".join(
            f"{ratio} {value:.2f}x" for ratio, value in values.items() if value is not None
        )
        print(f"  {key:<20} {text}")
    for ratio, meaning in result["ratios"].items():
        print(f"  {ratio}: {meaning}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=None, help=f"of {list(SECTIONS)} (default: all)")
    parser.add_argument(
        "--configs", default=None, help=f"comma-separated indices into {CONFIGS} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats, configs 0 and 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples (default 9)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the Triton kernels (backend='auto'); a layer they leave to the reference "
        "loop is reported, not timed",
    )
    args = parser.parse_args(argv)
    if args.sections is None:
        args.sections = ",".join(SECTIONS)
    args.section_list = [s.strip() for s in args.sections.split(",") if s.strip()]
    for section in args.section_list:
        if section not in SECTIONS:
            parser.error(f"--sections: each must be one of {list(SECTIONS)}, got {section!r}")
    if args.configs is None:
        indices = QUICK_CONFIGS if args.quick else list(range(len(CONFIGS)))
    else:
        try:
            indices = [int(i) for i in args.configs.split(",") if i.strip()]
        except ValueError:
            parser.error(f"--configs: comma-separated integers, got {args.configs!r}")
        for i in indices:
            if not 0 <= i < len(CONFIGS):
                parser.error(f"--configs: indices must be in 0..{len(CONFIGS) - 1}, got {i}")
    args.config_list = [CONFIGS[i] for i in indices]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 9
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    print(
        f"machine: {info['cpu']} ({info['logical_cpus']} logical CPUs), torch {info['torch']} "
        f"with {info['torch_threads']} threads; float32, timer {args.timer}, "
        f"median of {args.repeats}"
    )
    results = {}
    for name in args.section_list:
        results[name] = SECTIONS[name](args)
        print_section(name, results[name])
    payload = {
        "machine": info,
        "settings": {
            "repeats": args.repeats,
            "timer": args.timer,
            "dtype": "float32",
            "device": args.device,
        },
        "sections": results,
    }
    write_json(args.json, payload)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
