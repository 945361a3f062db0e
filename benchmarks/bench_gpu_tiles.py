"""Tile sweep for the Triton recurrent kernels: time per step under each tile shape (CUDA only).

    python benchmarks/bench_gpu_tiles.py [--json PATH] [--dtype float32|bfloat16]

For the LSTM at a few (batch, hidden) sizes, inference forward and training step, it times
rnnkit's gpu backend under each tile shape, with and without the hidden units split over
programs, next to torch.nn (cuDNN), median of repeats with CUDA synchronisation, and reports
microseconds per step. It sets the
module-level tile constants of rnnkit.kernels.gpu._common for each row, which is how a new
default would be chosen. Prints a table, writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_layers import GPU_TILE_NAMES, set_gpu_tile, write_json

import rnnkit

SIZES = [(1, 128), (1, 512), (16, 256), (64, 512), (256, 1024)]  # (batch, hidden)
# In bench_layers.GPU_TILE_NAMES order: the tile constants of kernels.gpu._common.
TILES = [
    (16, 64, 32, 32, 4, 3),
    (16, 64, 32, 64, 8, 3),
    (16, 64, 32, 64, 4, 3),
    (16, 64, 32, 32, 8, 3),
    (16, 64, 16, 64, 4, 3),
    (16, 32, 32, 32, 4, 3),
    (16, 64, 32, 64, 4, 1),
]
STEPS = 100
DEFAULT_JSON = Path(__file__).parent / "results" / "gpu-tiles.json"


def median_seconds(function, repeats: int = 10) -> float:
    """Median wall time of one call after a warm-up, synchronising the device around each."""
    function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_tile(rows: list[dict]) -> tuple[int, ...] | None:
    """The tile with the lowest geometric mean time per step over the sizes and modes it ran."""
    logs: dict[tuple, list[float]] = {}
    failed = {tuple(row["tile"]) for row in rows if "error" in row}
    for row in rows:
        if tuple(row["tile"]) not in failed:
            logs.setdefault(tuple(row["tile"]), []).append(math.log(row["us_per_step"]))
    if not logs:
        return None
    return min(logs, key=lambda tile: sum(logs[tile]) / len(logs[tile]))


def write_results(args, rows: list[dict]) -> tuple[int, ...] | None:
    """Write the rows and the best tile so far as JSON; return the best tile."""
    best = best_tile(rows)
    payload = {
        "gpu": torch.cuda.get_device_name(0),
        "dtype": args.dtype,
        "tile_names": GPU_TILE_NAMES,
        "rows": rows,
        "best_tile": best,
    }
    write_json(args.json, payload)
    return best


def step_calls(layer, x):
    """mode -> a call that runs one inference pass or one training step."""

    def inference():
        with torch.inference_mode():
            layer(x)

    def training():
        layer.zero_grad(set_to_none=True)
        output, _ = layer(x)
        output.sum().backward()

    return {"inference": inference, "training": training}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sweep")
        return 0
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'B':>4} {'H':>5} {'tile':<22} {'mode':<9} {'us/step':>8} {'cuDNN':>8}")
    for batch, hidden in SIZES:
        torch.manual_seed(0)
        theirs = torch.nn.LSTM(hidden, hidden).cuda().to(dtype)
        mine = rnnkit.from_torch(theirs, backend="gpu")
        x = torch.randn(STEPS, batch, hidden, device="cuda", dtype=dtype)
        cudnn = {mode: median_seconds(call) for mode, call in step_calls(theirs, x).items()}
        for tile in TILES:
            set_gpu_tile(tile)
            for mode, call in step_calls(mine, x).items():
                try:
                    seconds = median_seconds(call)
                except Exception as error:  # noqa: BLE001 -- a failing tile is reported
                    seconds, text = None, f"{type(error).__name__}: {error}"[:200]
                row = {"batch": batch, "hidden": hidden, "tile": tile, "mode": mode}
                row["cudnn_us_per_step"] = cudnn[mode] / STEPS * 1e6
                if seconds is None:
                    row["error"] = text
                    shown = "error"
                else:
                    row["us_per_step"] = seconds / STEPS * 1e6
                    shown = f"{row['us_per_step']:.2f}"
                rows.append(row)
                print(
                    f"{batch:>4} {hidden:>5} {','.join(map(str, tile)):<22} {mode:<9} "
                    f"{shown:>8} {row['cudnn_us_per_step']:>8.2f}",
                    flush=True,
                )
        write_results(args, rows)  # after each size, so a run cut short keeps what it measured
    best = write_results(args, rows)
    print(f"best tile ({', '.join(GPU_TILE_NAMES)}): {best}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
