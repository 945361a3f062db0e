"""Per-step latency at batch 1: rnnkit.Stream(rnnkit.LSTM) against a torch.nn.LSTMCell loop.

    python benchmarks/bench_stream.py [--hidden 128 256 512] [--steps 2000] [--rounds 7]

Every method steps the same weights through the same inputs (the outputs are compared), the
methods take turns round by round so that machine noise hits them alike, and the median of the
rounds is reported. Also timed, to show where a step's time goes: the rnnkit layer called on one
time step (what Stream avoids), torch.nn.LSTM called on one time step, and a cProfile of both
rnnkit paths. Prints a table and writes benchmarks/results/stream.json; asserts no times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rnnkit
from rnnkit.stream import Stream

RESULTS = Path(__file__).parent / "results" / "stream.json"


def make_methods(hidden: int, seed: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> step(x (1, I)) returning h (1, H); every method holds the same LSTM weights."""
    torch.manual_seed(seed)
    layer = rnnkit.LSTM(hidden, hidden).eval()
    cell = torch.nn.LSTMCell(hidden, hidden)
    torch_layer = torch.nn.LSTM(hidden, hidden)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(layer, f"{name}_l0"))
            getattr(torch_layer, f"{name}_l0").copy_(getattr(layer, f"{name}_l0"))
    stream = Stream(layer)
    cell_state: list = [None]
    layer_state: list = [None]
    torch_state: list = [None]

    def stream_step(x):
        return stream.step(x.unsqueeze(0))[0]

    def cell_step(x):
        cell_state[0] = cell(x, cell_state[0])
        return cell_state[0][0]

    def layer_step(x):
        output, layer_state[0] = layer(x.unsqueeze(0), layer_state[0])
        return output[0]

    def torch_layer_step(x):
        output, torch_state[0] = torch_layer(x.unsqueeze(0), torch_state[0])
        return output[0]

    return {
        "rnnkit Stream.step": stream_step,
        "torch.nn.LSTMCell loop": cell_step,
        "rnnkit.LSTM, 1 step per call": layer_step,
        "torch.nn.LSTM, 1 step per call": torch_layer_step,
    }


def time_methods(methods, inputs: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Per-step seconds of each method, one entry per round; methods alternate within a round."""
    timings: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, step in methods.items():
            start = time.perf_counter()
            for x in inputs:
                step(x)
            timings[name].append((time.perf_counter() - start) / len(inputs))
    return timings


def final_outputs_agree(hidden: int, inputs: torch.Tensor, seed: int) -> float:
    """Largest difference between the methods' outputs after the same steps from a fresh state."""
    methods = make_methods(hidden, seed)
    finals = []
    with torch.inference_mode():
        for step in methods.values():
            for x in inputs:
                output = step(x)
            finals.append(output)
    return max(float((final - finals[0]).abs().max()) for final in finals)


def profile(step: Callable, inputs: torch.Tensor, top: int = 8) -> list[dict]:
    """The functions where `step` spends its time (cProfile, by own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for x in inputs:
        step(x)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = sum(entry[2] for entry in stats.stats.values())
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})" if file != "~" else name,
            "share_of_time": round(own / total, 3),
            "us_per_step": round(own / len(inputs) * 1e6, 2),
        }
        for (file, line, name), (_, _, own, _, _) in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--steps", type=int, default=1000, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for hidden in args.hidden:
        inputs = torch.randn(args.steps, 1, hidden)
        difference = final_outputs_agree(hidden, inputs[:50], seed=hidden)
        methods = make_methods(hidden, seed=hidden)  # built outside inference mode, as models are
        with torch.inference_mode():
            time_methods(methods, inputs[:200], rounds=1)  # warm-up: kernels compiled, caches hot
            timings = time_methods(methods, inputs, args.rounds)
            medians = {name: statistics.median(values) for name, values in timings.items()}
            baseline = medians["torch.nn.LSTMCell loop"]
            profiled = inputs[: max(200, args.steps // 4)]
            results.append(
                {
                    "hidden_size": hidden,
                    "input_size": hidden,
                    "max_output_difference": difference,
                    "per_step_us_median": {k: round(v * 1e6, 2) for k, v in medians.items()},
                    "per_step_us_min": {k: round(min(v) * 1e6, 2) for k, v in timings.items()},
                    "ratio_to_lstmcell": {k: round(v / baseline, 3) for k, v in medians.items()},
                    "profile_stream_step": profile(methods["rnnkit Stream.step"], profiled),
                    "profile_layer_step": profile(
                        methods["rnnkit.LSTM, 1 step per call"], profiled
                    ),
                }
            )

    names = list(results[0]["per_step_us_median"])
    print(f"per-step latency at batch 1, median of {args.rounds} rounds x {args.steps} steps (us)")
    print(f"{'hidden':>6}  " + "  ".join(f"{name:>30}" for name in names))
    for row in results:
        cells = [
            f"{row['per_step_us_median'][n]:>9.1f} ({row['ratio_to_lstmcell'][n]:.2f}x LSTMCell)"
            for n in names
        ]
        print(f"{row['hidden_size']:>6}  " + "  ".join(f"{c:>30}" for c in cells))
    print(
        "\nwhere a step's time goes (own time per step, cProfile), hidden",
        results[0]["hidden_size"],
    )
    for key in ("profile_stream_step", "profile_layer_step"):
        print(f"  {key}:")
        for entry in results[0][key][:6]:
            print(f"    {entry['us_per_step']:>8.1f} us  {entry['function']}")

    report = {
        "benchmark": "stream per-step latency, batch 1",
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=args.output.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(report, file, indent=2)
    os.replace(temp_name, args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
