"""The GPU kernels' barrier among programs, polled with atomics or with acquire loads (CUDA only).

    python benchmarks/bench_gpu_barrier.py [--json PATH] [--repeats N]

Times (1) a kernel that does nothing but cross the barrier, for several program counts, under
both polling styles, and (2) the LSTM, GRU and RNN layers per step (inference and training
step, float32) under RNNKIT_GPU_BARRIER=atomic and =load, each in its own process since the
choice is read at import. Prints a table and writes JSON with the faster style ("best": "load"
only where its geometric-mean layer time is at least 3% below the atomic one's). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from bench_gpu_tiles import median_seconds, step_calls
from bench_layers import write_json

DEFAULT_JSON = Path(__file__).parent / "results" / "gpu-barrier.json"
CONFIGS = [(16, 1000, 128, 128), (1, 1000, 256, 256), (32, 100, 256, 256), (256, 100, 1024, 1024)]
PROGRAM_COUNTS = (4, 16, 64, 128)
BARRIER_STEPS = 20000
LAYER_TIMEOUT = 120  # seconds for one style's layer timings, compiles included


def barrier_kernel():
    """A Triton kernel that crosses the barrier T times in every program, atomic or load polls."""
    global _common  # the kernel finds it among this module's globals, as Triton requires
    import triton
    import triton.language as tl

    from rnnkit.kernels.gpu import _common

    @triton.jit
    def barriers_only(counter_ptr, T, LOAD: tl.constexpr):
        programs = tl.num_programs(1)
        arrivals = programs * 0
        for _ in range(T):
            if LOAD:
                arrivals = _common.sync_programs_load(counter_ptr, arrivals, programs, True)
            else:
                arrivals = _common.sync_programs_atomic(counter_ptr, arrivals, programs, True)

    return barriers_only


def barrier_rows(repeats: int) -> list[dict]:
    """Microseconds per barrier crossing, for each program count and polling style."""
    barriers_only = barrier_kernel()
    rows = []
    for programs in PROGRAM_COUNTS:
        for style in ("atomic", "load"):

            def run(programs=programs, style=style):
                counter = torch.zeros(1, device="cuda", dtype=torch.int32)
                barriers_only[(1, programs)](counter, BARRIER_STEPS, LOAD=style == "load")

            us = median_seconds(run, repeats) / BARRIER_STEPS * 1e6
            rows.append({"programs": programs, "barrier": style, "us_per_barrier": us})
            print(f"barrier only   {style:6} {programs:4} programs  {us:8.3f} us", flush=True)
    return rows


def layer_rows(repeats: int) -> list[dict]:
    """Microseconds per step of the layers under this process's RNNKIT_GPU_BARRIER."""
    import rnnkit

    rows = []
    for cell, make in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU), ("rnn", torch.nn.RNN)):
        for batch, steps, inputs, hidden in CONFIGS:
            torch.manual_seed(0)
            layer = rnnkit.from_torch(make(inputs, hidden).cuda(), backend="gpu")
            x = torch.randn(steps, batch, inputs, device="cuda")
            for mode, call in step_calls(layer, x).items():
                us = median_seconds(call, repeats) / steps * 1e6
                config = [batch, steps, inputs, hidden]
                rows.append({"cell": cell, "config": config, "mode": mode, "us_per_step": us})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    if args.layers_only:  # the child process of one polling style
        write_json(args.json, {"rows": layer_rows(args.repeats)})
        return 0
    result = {"gpu": torch.cuda.get_device_name(0), "barrier_only": barrier_rows(args.repeats)}
    for style in ("atomic", "load"):
        part = args.json.with_suffix(f".{style}.tmp")
        command = [sys.executable, __file__, "--layers-only", "--json", str(part)]
        command += ["--repeats", str(args.repeats)]
        environment = dict(os.environ, RNNKIT_GPU_BARRIER=style)
        try:
            done = subprocess.run(command, env=environment, timeout=LAYER_TIMEOUT)
            result[style] = json.loads(part.read_text())["rows"] if done.returncode == 0 else None
        except subprocess.TimeoutExpired:
            result[style] = None
        part.unlink(missing_ok=True)
        if result[style] is None:
            print(f"layers under the {style} barrier: failed or timed out", flush=True)
    best = "atomic"
    if result["atomic"] and result["load"]:
        print(f"{'cell':5} {'B,T,I,H':18} {'mode':9} {'atomic us':>10} {'load us':>10}")
        logs = []
        for atomic, load in zip(result["atomic"], result["load"], strict=True):
            logs.append(math.log(load["us_per_step"] / atomic["us_per_step"]))
            config = ",".join(map(str, atomic["config"]))
            print(
                f"{atomic['cell']:5} {config:18} {atomic['mode']:9} "
                f"{atomic['us_per_step']:10.2f} {load['us_per_step']:10.2f}"
            )
        result["load_over_atomic"] = math.exp(sum(logs) / len(logs))
        print(f"geometric mean, load / atomic time per step: {result['load_over_atomic']:.3f}")
        if result["load_over_atomic"] < 0.97:
            best = "load"
    result["best"] = best
    write_json(args.json, result)
    print(f"best barrier: {best}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
