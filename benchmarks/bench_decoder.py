"""A decoder's loop: a layer called once per time step, its state carried from call to call.

    python benchmarks/bench_decoder.py [--cells rnn,gru,lstm] [--steps 20] [--chunk 1]
                                       [--repeats 15]

Each sample runs a sequence of `steps` time steps through calls of `chunk` steps each
(batch_first (B, chunk, H), the state of one call fed to the next: a decoder's loop at chunk 1,
short chunks of a stream above it), then for training the backward of the sum of all outputs
(gradients for the parameters and the input). Implementations, all with the same weights and in one process,
taking turns sample by sample: rnnkit with backend="auto" (which runs one time step through
torch's fused cell op), rnnkit with backend="cpu" (its fused kernel forced: what "auto" ran
before), and torch.nn. The outputs are compared before timing. Prints a table of medians and
ratios (torch.nn / rnnkit, above 1: rnnkit faster) and writes benchmarks/results/decoder.json;
asserts no times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_layers import machine_info, write_json
from tqdm import tqdm

import rnnkit

RESULTS = Path(__file__).parent / "results" / "decoder.json"
CONFIGS = [(1, 64), (32, 256), (64, 512)]  # (batch, hidden); input size = hidden
CELLS = {"rnn": (rnnkit.RNN, torch.nn.RNN), "gru": (rnnkit.GRU, torch.nn.GRU),
         "lstm": (rnnkit.LSTM, torch.nn.LSTM)}  # fmt: skip
IMPLEMENTATIONS = ("rnnkit auto", "rnnkit cpu kernel", "torch.nn")


def build(cell: str, hidden: int) -> dict[str, torch.nn.Module]:
    """The three implementations of one layer, with the same weights."""
    mine, theirs = CELLS[cell]
    reference = theirs(hidden, hidden, batch_first=True)
    auto = mine(hidden, hidden, batch_first=True)
    auto.load_state_dict(reference.state_dict())
    kernel = mine(hidden, hidden, batch_first=True, backend="cpu")
    kernel.load_state_dict(reference.state_dict())
    return dict(zip(IMPLEMENTATIONS, (auto, kernel, reference)))


def decoder_loop(
    layer: torch.nn.Module, steps: torch.Tensor, chunk: int, train: bool
) -> Callable[[], list]:
    """A sample: one call per chunk of (B, T, I) steps, then the backward if training."""

    def run() -> list:
        state, outputs = None, []
        for t in range(0, steps.size(1), chunk):
            output, state = layer(steps[:, t : t + chunk], state)
            outputs.append(output)
        if train:
            torch.cat(outputs, dim=1).sum().backward()
        return outputs

    if train:
        return run
    return lambda: torch.inference_mode()(run)()


def time_config(cell: str, batch: int, hidden: int, args) -> list[dict]:
    torch.manual_seed(0)
    layers = build(cell, hidden)
    steps = torch.randn(batch, args.steps, hidden, requires_grad=True)
    rows = []
    for mode in ("inference", "training"):
        loops = {
            name: decoder_loop(layer, steps, args.chunk, mode == "training")
            for name, layer in layers.items()
        }
        expected = torch.cat(loops["torch.nn"](), dim=1)
        for name in IMPLEMENTATIONS[:2]:
            got = torch.cat(loops[name](), dim=1)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        samples: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.repeats + 2):  # the first two rounds warm up
            for name, loop in loops.items():
                start = time.perf_counter()
                loop()
                samples[name].append((time.perf_counter() - start) * 1e3)
        times = {name: statistics.median(values[2:]) for name, values in samples.items()}
        rows.append({
            "cell": cell, "batch": batch, "hidden": hidden, "steps": args.steps,
            "chunk": args.chunk, "mode": mode,
            "ms": times,
            "torch_over_auto": times["torch.nn"] / times["rnnkit auto"],
            "torch_over_kernel": times["torch.nn"] / times["rnnkit cpu kernel"],
        })  # fmt: skip
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="rnn,gru,lstm", help="comma-separated: rnn,gru,lstm")
    parser.add_argument("--steps", type=int, default=20, help="steps per sample (default 20)")
    parser.add_argument("--chunk", type=int, default=1, help="steps per call (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timed samples (default 15)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    args.cell_list = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in args.cell_list if c not in CELLS]
    if unknown or not args.cell_list:
        parser.error(f"--cells: each must be one of {sorted(CELLS)}, got {args.cells!r}")
    if min(args.steps, args.chunk, args.repeats) < 1:
        parser.error(
            f"--steps, --chunk and --repeats must be >= 1, got {args.steps}, {args.chunk} and "
            f"{args.repeats}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = [(cell, batch, hidden) for cell in args.cell_list for batch, hidden in CONFIGS]
    rows = []
    for cell, batch, hidden in tqdm(work, desc="decoder", unit="config"):
        rows.extend(time_config(cell, batch, hidden, args))
    machine = machine_info("cpu")
    print(f"\n{machine['cpu']}, torch {machine['torch']} with {machine['torch_threads']} threads; "
          f"{args.steps} steps per sample in calls of {args.chunk}, median of {args.repeats}, "
          "ms")  # fmt: skip
    header = f"{'cell':5} {'B':>3} {'H':>4} {'mode':10} " + " ".join(
        f"{name:>17}" for name in IMPLEMENTATIONS
    )
    print(header + f" {'torch/auto':>11} {'torch/kernel':>13}")
    for row in rows:
        times = " ".join(f"{row['ms'][name]:17.3f}" for name in IMPLEMENTATIONS)
        print(
            f"{row['cell']:5} {row['batch']:>3} {row['hidden']:>4} {row['mode']:10} {times} "
            f"{row['torch_over_auto']:10.2f}x {row['torch_over_kernel']:12.2f}x"
        )
    payload = {"machine": machine, "steps": args.steps, "chunk": args.chunk,
               "repeats": args.repeats, "rows": rows}  # fmt: skip
    write_json(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
