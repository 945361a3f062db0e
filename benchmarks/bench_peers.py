"""rnnkit's fused CPU layers against both peers of ../shared/PEERS.md, torch.nn and Flax (XLA).

    pip install jax flax          # not a dependency of rnnkit; only this script uses them
    python benchmarks/bench_peers.py [--cells lstm,gru,rnn] [--configs 0,1] [--repeats 15]
                                     [--warm-rounds 1]

PEERS.md's protocol: float32, one layer, unidirectional, batch_first, zero initial state; Flax is
`flax.linen.RNN` over `OptimizedLSTMCell` / `GRUCell` / `SimpleCell` under `jax.jit`, compiled
before timing; a training step is the forward and the backward of the sum of the outputs, with
gradients for the parameters and the input. All three run in one process, taking turns sample by
sample (each sample after untimed warm-up calls, and all samples after --warm-rounds untimed
rounds: see time_rounds), so that the machine's drift reaches each alike. Prints a table
of medians and the ratios of each peer's time to rnnkit's (above 1: rnnkit faster), and writes
benchmarks/results/peers-cpu.json; asserts no times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_layers import (
    CONFIGS,
    build_layers,
    machine_info,
    step_functions,
    write_json,
)
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results" / "peers-cpu.json"
CELLS = ("lstm", "gru", "rnn")
NAMES = ("rnnkit", "torch.nn", "flax")
INSTALL_HINT = "bench_peers.py needs JAX and Flax, which rnnkit does not: pip install jax flax"


def import_flax():
    """(jax, flax.linen), or SystemExit with INSTALL_HINT."""
    try:
        import flax.linen as linen
        import jax
    except ImportError as error:
        raise SystemExit(f"{INSTALL_HINT} ({error})") from error
    return jax, linen


def flax_functions(cell: str, config, jax, linen) -> dict[str, Callable[[], None]]:
    """mode -> a call of the jitted Flax layer (compiled here, before any timing)."""
    batch, steps, input_size, hidden = config
    cell_class = {"lstm": linen.OptimizedLSTMCell, "gru": linen.GRUCell, "rnn": linen.SimpleCell}
    model = linen.RNN(cell_class[cell](features=hidden))
    x = jax.numpy.asarray(np.random.default_rng(1).standard_normal((batch, steps, input_size)),
                          dtype=jax.numpy.float32)  # fmt: skip
    params = model.init(jax.random.PRNGKey(0), x)
    forward = jax.jit(model.apply)
    gradients = jax.jit(jax.grad(lambda p, inputs: model.apply(p, inputs).sum(), argnums=(0, 1)))

    def inference() -> None:
        jax.block_until_ready(forward(params, x))

    def training() -> None:
        jax.block_until_ready(gradients(params, x))

    inference()
    training()
    return {"inference": inference, "training": training}


def time_rounds(
    functions: dict[str, Callable[[], None]], repeats: int, warm_rounds: int = 1
) -> dict[str, float]:
    """name -> median seconds per call over `repeats` rounds, after `warm_rounds` untimed ones; in
    each round every name runs untimed warm-up calls, then one sample of calls. The warm-up
    matters here: a call right after another framework's measured up to 1.7x slower than back to
    back (rnnkit's batch-1 RNN training step after a Flax call), which timing alternate calls
    would charge to each. The untimed rounds matter for the first rounds of a process: there
    rnnkit's batch-1 calls took 17-370 page faults each (at about 5 us a fault on this machine)
    where later rounds took none, as glibc's heap, shared by torch, numpy and numba, trimmed and
    grew again between the frameworks' turns until its thresholds adapted; XLA's allocator is its
    own (Xeon, 2026-11-29)."""
    calls = {}
    for name, function in functions.items():
        start = time.perf_counter()
        function()
        calls[name] = max(1, min(50, int(0.02 / max(time.perf_counter() - start, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(warm_rounds + repeats):
        for name, function in functions.items():
            for _ in range(max(1, calls[name] // 2)):
                function()
            start = time.perf_counter()
            for _ in range(calls[name]):
                function()
            if round_index >= warm_rounds:
                samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def run_config(cell: str, config, repeats: int, jax, linen, warm_rounds: int = 1) -> list[dict]:
    """The inference and training rows of one cell and configuration."""
    batch, steps, input_size, _ = config
    layers = build_layers(cell, config, "cpu", torch.float32, ("torch.nn", "rnnkit"))
    torch.manual_seed(1)
    x = torch.randn(batch, steps, input_size)
    functions = {name: step_functions(layer, x) for name, layer in layers.items()}
    functions["flax"] = flax_functions(cell, config, jax, linen)
    rows = []
    for mode in ("inference", "training"):
        times = time_rounds({name: functions[name][mode] for name in NAMES}, repeats, warm_rounds)
        best_peer = min(times["torch.nn"], times["flax"])
        rows.append({"cell": cell, "config": list(config), "mode": mode, "times": times,
                     "best_peer_over_rnnkit": best_peer / times["rnnkit"]})  # fmt: skip
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="lstm,gru,rnn", help="comma-separated: lstm,gru,rnn")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated indices into {CONFIGS[:4]} (default: all four, "
                             "PEERS.md's grid)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=15, help="timed samples (default 15)")
    parser.add_argument("--warm-rounds", type=int, default=1,
                        help="untimed rounds before the timed ones (default 1; 0: session 13's "
                        "protocol)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    args.cell_list = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not args.cell_list or any(c not in CELLS for c in args.cell_list):
        parser.error(f"--cells: each must be one of {CELLS}, got {args.cells!r}")
    try:
        indices = [int(i) for i in args.configs.split(",")] if args.configs else [0, 1, 2, 3]
    except ValueError:
        parser.error(f"--configs: comma-separated integers, got {args.configs!r}")
    if any(not 0 <= i < 4 for i in indices):
        parser.error(f"--configs: indices 0-3 (PEERS.md's four sizes), got {args.configs!r}")
    args.config_list = [CONFIGS[i] for i in indices]
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warm_rounds < 0:
        parser.error(f"--warm-rounds must be >= 0, got {args.warm_rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jax, linen = import_flax()
    work = [(cell, config) for cell in args.cell_list for config in args.config_list]
    rows = []
    for cell, config in tqdm(work, desc="peers", unit="config"):
        rows.extend(run_config(cell, config, args.repeats, jax, linen, args.warm_rounds))
    machine = machine_info("cpu")
    print(f"\n{machine['cpu']}, torch {machine['torch']} with {machine['torch_threads']} threads, "
          f"JAX {jax.__version__}; median of {args.repeats} after {args.warm_rounds} untimed "
          "round(s), ms; ratio = peer time / rnnkit time")  # fmt: skip
    print(f"{'cell':5} {'B,T,I,H':16} {'mode':10} {'rnnkit':>9} {'torch.nn':>9} {'flax':>9} "
          f"{'torch/rnnkit':>13} {'flax/rnnkit':>12}")  # fmt: skip
    for row in rows:
        times = row["times"]
        config = ",".join(map(str, row["config"]))
        print(
            f"{row['cell']:5} {config:16} {row['mode']:10} "
            + " ".join(f"{times[name] * 1e3:9.3f}" for name in NAMES)
            + f" {times['torch.nn'] / times['rnnkit']:12.2f}x"
            + f" {times['flax'] / times['rnnkit']:11.2f}x"
        )
    print("\nrows where rnnkit is slower than the faster peer:")
    slower = [row for row in rows if row["best_peer_over_rnnkit"] < 1]
    for row in slower:
        print(f"  {row['cell']} {row['config']} {row['mode']}: {row['best_peer_over_rnnkit']:.2f}x")
    if not slower:
        print("  none")
    write_json(args.json, {"machine": machine, "jax": jax.__version__, "repeats": args.repeats,
                           "warm_rounds": args.warm_rounds, "rows": rows})  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
