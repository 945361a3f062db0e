"""Layer speed: rnnkit's fused backend against torch.nn and rnnkit's reference loop.

    python benchmarks/bench_layers.py [--cells lstm,gru,rnn] [--configs 0,1] [--quick]
        [--repeats N] [--no-reference] [--json PATH] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--threads N] [--timer wall|cpu] [--no-memory]

For each cell and (batch, steps, input, hidden) configuration, one layer, unidirectional,
batch_first, zero initial state, the same weights everywhere:
  inference  forward under torch.inference_mode
  training   forward + backward of the sum of the outputs (gradients for parameters and input)
on torch.nn, rnnkit backend="cpu" (backend="auto" with --device cuda) and rnnkit
backend="reference". The implementations take turns call by call so that machine noise hits them
alike; the median of the repeats is reported. Ratios are torch.nn time / rnnkit time (above 1:
rnnkit is faster), summarised by their geometric mean per cell. Achieved GFLOP/s counts the
matmuls only (forward 2*T*B*G*H*(I+H), training three times that) next to the machine's
measured matmul GFLOP/s. Peak memory: the growth of peak resident memory (CUDA: peak allocated)
over one training step at T=1000, and over a loop of LOOP_STEPS such steps (what a training loop
holds: memory a step leaves behind shows here, not in one step), each implementation in a fresh
subprocess. A row that fails shows its error instead of a time. Prints a table, writes JSON;
asserts no times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

import rnnkit

CONFIGS = [
    (1, 100, 64, 64),
    (32, 100, 64, 128),
    (32, 200, 128, 256),
    (64, 100, 256, 512),
    (16, 1000, 32, 128),
]
# Issue 4's GPU grid: batch 1 to 256, hidden 128 to 1024, steps 100 to 1000.
CUDA_CONFIGS = [
    (1, 100, 128, 128),
    (1, 1000, 256, 256),
    (32, 100, 256, 256),
    (16, 1000, 128, 128),
    (64, 200, 512, 512),
    (256, 100, 1024, 1024),
]
QUICK_CONFIGS = [0, 1]
GPU_TILE_NAMES = ("BLOCK_B", "MAX_BLOCK_B", "MAX_BLOCK_N", "MAX_BLOCK_K", "NUM_WARPS", "NUM_STAGES")
MEMORY_CONFIG = (16, 1000, 32, 128)
LOOP_STEPS = 20
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
TORCH_CLASSES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
DEFAULT_JSON = Path(__file__).parent / "results" / "layers-cpu.json"
IMPLEMENTATIONS = ("torch.nn", "rnnkit", "reference")


def reference_is_slow(config: tuple[int, int, int, int]) -> bool:
    """The reference loop takes seconds per training step on these: long sequences or H >= 512."""
    _, steps, _, hidden = config
    return steps >= 1000 or hidden >= 512


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or platform's guess elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_kernel_blas() -> str:
    """The BLAS library behind the fused CPU kernels' products (RNNKIT_CPU_BLAS picks it)."""
    from rnnkit.kernels.cpu import blas

    return blas.LIBRARY


def set_gpu_tile(tile: tuple[int, ...]) -> None:
    """Set the tile constants the gpu kernels' launch plan reads (GPU_TILE_NAMES order)."""
    from rnnkit.kernels.gpu import _common

    for name, value in zip(GPU_TILE_NAMES, tile, strict=True):
        setattr(_common, name, value)


def machine_info(device: str) -> dict:
    """What ran the benchmark: CPU, threads, library versions, GPU if any."""
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rnnkit": rnnkit.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    else:
        info["cpu_kernel_blas"] = cpu_kernel_blas()
    return info


def synchronizer(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def clock(timer: str) -> Callable[[], float]:
    """wall: perf_counter; cpu: this process's CPU time over all threads (robust to a busy machine)."""
    return time.perf_counter if timer == "wall" else time.process_time


def matmul_gflops(device: str, dtype: torch.dtype, timer: str, size: int) -> float:
    """Measured matmul throughput, size^3, median of 5."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync, now = synchronizer(device), clock(timer)
    torch.mm(a, b)
    sync()
    times = []
    for _ in range(5):
        start = now()
        torch.mm(a, b)
        sync()
        times.append(now() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def build_layers(cell: str, config, device: str, dtype: torch.dtype, implementations) -> dict:
    """implementation name -> layer, all holding the same weights."""
    _, _, input_size, hidden = config
    torch.manual_seed(0)
    torch_layer = TORCH_CLASSES[cell](input_size, hidden, batch_first=True).to(device, dtype)
    layers = {}
    for name in implementations:
        if name == "torch.nn":
            layers[name] = torch_layer
        else:
            backend = (
                "reference" if name == "reference" else ("auto" if device == "cuda" else "cpu")
            )
            layers[name] = rnnkit.from_torch(torch_layer, backend=backend)
    return layers


def step_functions(layer, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """mode -> a call that runs one inference pass or one training step of `layer` on `x`."""
    params = list(layer.parameters())
    x_train = x.detach().clone().requires_grad_(True)

    def inference():
        with torch.inference_mode():
            layer(x)

    def training():
        for param in params:
            param.grad = None
        x_train.grad = None
        output, _ = layer(x_train)
        output.sum().backward()

    return {"inference": inference, "training": training}


def time_interleaved(
    functions: dict[str, Callable[[], None]], repeats: int, device: str, timer: str
) -> dict[str, float | str]:
    """name -> median seconds per call (calls alternate between names), or the error's text."""
    sync, now = synchronizer(device), clock(timer)
    results: dict[str, float | str] = {}
    calls: dict[str, int] = {}
    for name, function in functions.items():
        try:
            function()  # compile / allocate
            sync()
            start = now()
            function()
            sync()
            once = now() - start
            # Several calls per sample where one call is too short for the clock to time well.
            calls[name] = max(1, min(50, int(0.005 / max(once, 1e-9))))
        except Exception as error:  # noqa: BLE001 -- a failing row is reported, not fatal
            results[name] = f"{type(error).__name__}: {error}"
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name in calls:
            function = functions[name]
            start = now()
            for _ in range(calls[name]):
                function()
            sync()
            samples[name].append((now() - start) / calls[name])
    for name, values in samples.items():
        results[name] = statistics.median(values)
    return results


def matmul_flops(cell: str, config, mode: str) -> float:
    batch, steps, input_size, hidden = config
    forward = 2 * steps * batch * GATES[cell] * hidden * (input_size + hidden)
    return forward if mode == "inference" else 3 * forward


def run_config(cell: str, config, args, implementations) -> list[dict]:
    """The inference and training rows of one cell and configuration."""
    batch, steps, input_size, _ = config
    dtype = getattr(torch, args.dtype)
    try:
        layers = build_layers(cell, config, args.device, dtype, implementations)
        torch.manual_seed(1)
        x = torch.randn(batch, steps, input_size, device=args.device, dtype=dtype)
        functions = {name: step_functions(layer, x) for name, layer in layers.items()}
    except Exception as error:  # noqa: BLE001
        text = f"{type(error).__name__}: {error}"
        return [
            {
                "cell": cell,
                "config": list(config),
                "mode": mode,
                "times": {},
                "errors": {"all": text},
            }
            for mode in ("inference", "training")
        ]
    rows = []
    for mode in ("inference", "training"):
        timed = time_interleaved(
            {name: fns[mode] for name, fns in functions.items()},
            args.repeats,
            args.device,
            args.timer,
        )
        times = {name: value for name, value in timed.items() if isinstance(value, float)}
        errors = {name: value for name, value in timed.items() if isinstance(value, str)}
        row = {"cell": cell, "config": list(config), "mode": mode, "times": times, "errors": errors}
        if "torch.nn" in times and "rnnkit" in times:
            row["ratio_torch_over_rnnkit"] = times["torch.nn"] / times["rnnkit"]
        if "rnnkit" in times:
            row["rnnkit_gflops"] = matmul_flops(cell, config, mode) / times["rnnkit"] / 1e9
        if "torch.nn" in times:
            row["torch_gflops"] = matmul_flops(cell, config, mode) / times["torch.nn"] / 1e9
        rows.append(row)
    return rows


def geometric_means(rows: list[dict]) -> dict:
    """cell -> mode -> geometric mean of torch.nn / rnnkit over the rows that have both."""
    means: dict = {}
    for row in rows:
        ratio = row.get("ratio_torch_over_rnnkit")
        if ratio is not None:
            means.setdefault(row["cell"], {}).setdefault(row["mode"], []).append(math.log(ratio))
    return {
        cell: {mode: math.exp(sum(logs) / len(logs)) for mode, logs in modes.items()}
        for cell, modes in means.items()
    }


def format_time(row: dict, name: str) -> str:
    if name in row["times"]:
        return f"{row['times'][name] * 1e3:.3f}"
    if name in row["errors"] or "all" in row["errors"]:
        return "error"
    return row.get("skipped", {}).get(name, "-")


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'cell':<5} {'B,T,I,H':<16} {'mode':<9} {'torch.nn ms':>11} {'rnnkit ms':>10} "
        f"{'ref ms':>10} {'torch/rnnkit':>12} {'rnnkit GF/s':>11} {'torch GF/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = row.get("ratio_torch_over_rnnkit")
        ratio_text = f"{ratio:.2f}x" if ratio else "-"
        gflops = {
            key: f"{row[key]:.1f}" if key in row else "-"
            for key in ("rnnkit_gflops", "torch_gflops")
        }
        print(
            f"{row['cell']:<5} {','.join(map(str, row['config'])):<16} {row['mode']:<9} "
            f"{format_time(row, 'torch.nn'):>11} {format_time(row, 'rnnkit'):>10} "
            f"{format_time(row, 'reference'):>10} "
            f"{ratio_text:>12} {gflops['rnnkit_gflops']:>11} {gflops['torch_gflops']:>10}"
        )
    for row in rows:
        for name, text in row["errors"].items():
            print(f"  error {row['cell']} {row['config']} {row['mode']} {name}: {text}")


# -- peak memory -------------------------------------------------------------------------------
def resident_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_resident() -> bool:
    """Reset the kernel's peak-resident mark (Linux >= 4.0), so VmHWM then measures one step."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(cell: str, implementation: str, device: str, dtype_name: str) -> None:
    """In a fresh process: peak memory growth of one training step at MEMORY_CONFIG, then of a
    loop of LOOP_STEPS of them, from the same starting point, as JSON."""
    dtype = getattr(torch, dtype_name)
    tiny = (2, 3, MEMORY_CONFIG[2], MEMORY_CONFIG[3])
    layer = build_layers(cell, tiny, device, dtype, [implementation])[implementation]
    # Compile kernels and load libraries on a tiny input first, so that only the step is counted.
    step_functions(layer, torch.randn(2, 3, tiny[2], device=device, dtype=dtype))["training"]()
    batch, steps, input_size, _ = MEMORY_CONFIG
    x = torch.randn(batch, steps, input_size, device=device, dtype=dtype)
    training = step_functions(layer, x)["training"]

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.max_memory_allocated()

        def peak_growth(calls: int) -> int:
            torch.cuda.reset_peak_memory_stats()
            for _ in range(calls):
                training()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before

    else:
        before = resident_bytes("VmRSS")

        def peak_growth(calls: int) -> int:
            reset = reset_peak_resident()
            for _ in range(calls):
                training()
            if reset:
                return resident_bytes("VmHWM") - before
            # No /proc/self/clear_refs: the lifetime peak, which may hide a smaller step.
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before

    growth = peak_growth(1)
    loop_growth = peak_growth(LOOP_STEPS)
    print(json.dumps({"peak_growth_bytes": growth, "loop_peak_growth_bytes": loop_growth}))


def measure_memory(cells: list[str], args) -> list[dict]:
    """Peak memory growth of a training step per cell and implementation, fresh process each."""
    results = []
    for cell in cells:
        for implementation in ("torch.nn", "rnnkit"):
            command = [
                sys.executable,
                __file__,
                "--memory-child",
                f"{cell},{implementation}",
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ]
            entry = {"cell": cell, "implementation": implementation, "config": list(MEMORY_CONFIG)}
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    entry["error"] = done.stderr.strip().splitlines()[-1:] or ["failed"]
                    entry["error"] = entry["error"][0]
                else:
                    measured = json.loads(done.stdout.strip().splitlines()[-1])
                    entry["peak_growth_mib"] = measured["peak_growth_bytes"] / 2**20
                    entry["loop_steps"] = LOOP_STEPS
                    entry["loop_peak_growth_mib"] = measured["loop_peak_growth_bytes"] / 2**20
            except subprocess.TimeoutExpired:
                entry["error"] = "timed out"
            results.append(entry)
    return results


def print_memory(results: list[dict], device: str) -> None:
    label = "peak CUDA memory allocated" if device == "cuda" else "peak resident memory"
    print(f"\n{label} growth at B,T,I,H={MEMORY_CONFIG}, one training step / a loop of them:")
    for entry in results:
        value = entry.get("peak_growth_mib")
        if value is None:
            text = f"error: {entry['error']}"
        else:
            text = f"{value:.1f} MiB / {entry['loop_peak_growth_mib']:.1f} MiB over {LOOP_STEPS}"
        print(f"  {entry['cell']:<5} {entry['implementation']:<9} {text}")


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="lstm,gru,rnn", help="comma-separated: lstm,gru,rnn")
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated indices into {CONFIGS} (--device cuda: {CUDA_CONFIGS}) "
        "(default: all; --quick: 0,1)",
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats, configs 0 and 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples (default 15)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", type=Path, default=None, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or process CPU time (steadier on a busy machine; counts every thread)",
    )
    parser.add_argument(
        "--gpu-tile",
        default=None,
        help="BLOCK_B,MAX_BLOCK_B,MAX_BLOCK_N,MAX_BLOCK_K,NUM_WARPS,NUM_STAGES for the gpu kernels "
        "(default: rnnkit's; benchmarks/bench_gpu_tiles.py sweeps them)",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for cell in cells:
        if cell not in GATES:
            parser.error(f"--cells: each must be one of {tuple(GATES)}, got {cell!r}")
    args.cell_list = cells
    grid = CUDA_CONFIGS if args.device == "cuda" else CONFIGS
    if args.configs is None:
        indices = QUICK_CONFIGS if args.quick else list(range(len(grid)))
    else:
        try:
            indices = [int(i) for i in args.configs.split(",") if i.strip()]
        except ValueError:
            parser.error(f"--configs: comma-separated integers, got {args.configs!r}")
        for i in indices:
            if not 0 <= i < len(grid):
                parser.error(f"--configs: indices must be in 0..{len(grid) - 1}, got {i}")
    args.config_list = [grid[i] for i in indices]
    if args.gpu_tile is not None:
        try:
            args.gpu_tile = tuple(int(v) for v in args.gpu_tile.split(","))
        except ValueError:
            parser.error(f"--gpu-tile: six comma-separated integers, got {args.gpu_tile!r}")
        if len(args.gpu_tile) != len(GPU_TILE_NAMES):
            parser.error(f"--gpu-tile: six comma-separated integers, got {args.gpu_tile!r}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.json is None:
        args.json = (
            DEFAULT_JSON if args.device == "cpu" else DEFAULT_JSON.with_name("layers-cuda.json")
        )
    return args


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(payload, handle, indent=2)
        temporary = handle.name
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        cell, implementation = args.memory_child.split(",")
        memory_child(cell, implementation, args.device, args.dtype)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "--device cuda: no CUDA GPU is present on this machine (torch.cuda.is_available() "
            "is False); nothing was benchmarked."
        )
        return 0
    info = machine_info(args.device)
    if args.device == "cuda":
        if args.gpu_tile is not None:
            set_gpu_tile(args.gpu_tile)
        from rnnkit.kernels.gpu import _common

        info["gpu_tile"] = {name: getattr(_common, name) for name in GPU_TILE_NAMES}
    dtype = getattr(torch, args.dtype)
    peak = matmul_gflops(args.device, dtype, args.timer, 512 if args.quick else 2048)
    print(
        f"machine: {info['cpu']} ({info['logical_cpus']} logical CPUs), torch {info['torch']} "
        f"with {info['torch_threads']} threads"
        + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + (
            f"; TF32 in cuDNN and the kernels: {info['cudnn_allow_tf32']}; tile {info['gpu_tile']}"
            if "gpu" in info
            else f"; fused CPU kernels' BLAS: {info['cpu_kernel_blas']}"
        )
    )
    print(
        f"device {args.device}, {args.dtype}, timer {args.timer}, median of {args.repeats}; "
        f"matmul {peak:.0f} GFLOP/s (torch.mm {512 if args.quick else 2048}^3)"
    )
    print("ratio = torch.nn time / rnnkit time (above 1: rnnkit faster)\n")

    rows = []
    jobs = [(cell, config) for cell in args.cell_list for config in args.config_list]
    for cell, config in tqdm(jobs, desc="layers", unit="config", file=sys.stderr):
        implementations = ["torch.nn", "rnnkit"]
        skipped = {}
        if args.no_reference:
            skipped["reference"] = "off"
        elif reference_is_slow(config):
            skipped["reference"] = "slow"
        else:
            implementations.append("reference")
        for row in run_config(cell, config, args, implementations):
            row["skipped"] = skipped
            rows.append(row)
    print_table(rows)
    means = geometric_means(rows)
    print("\ngeometric mean of torch.nn / rnnkit:")
    for cell, modes in means.items():
        print(f"  {cell:<5} " + "  ".join(f"{mode} {value:.2f}x" for mode, value in modes.items()))
    if any(row.get("skipped", {}).get("reference") == "slow" for row in rows):
        print(
            "ref 'slow': the reference loop was skipped on configurations with T >= 1000 or H >= 512"
        )

    memory = []
    if not args.no_memory:
        memory = measure_memory(args.cell_list, args)
        print_memory(memory, args.device)

    payload = {
        "machine": info,
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "timer": args.timer,
            "reference": not args.no_reference,
        },
        "matmul_gflops": peak,
        "rows": rows,
        "geometric_mean_torch_over_rnnkit": means,
        "peak_memory": memory,
    }
    write_json(args.json, payload)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
