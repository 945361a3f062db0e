"""Registers and stack (spills) per thread of the on-chip GPU kernels, compiled for sm_90.

    python benchmarks/gpu_kernel_resources.py [--json PATH] [--widths 64,128,256]

Needs no GPU: Triton compiles each kernel variant to a cubin for sm_90 (as
tests/kernels/gpu/test_compile.py does) and cuobjdump, which ships in the triton wheel, reads
its resource usage. A variant whose stack is not zero spills registers to local memory. Prints a
table and writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_layers import write_json

DEFAULT_JSON = Path(__file__).parent / "results" / "gpu-kernel-resources.json"
WIDTHS = (64, 128, 256)


def variants(widths: tuple[int, ...] = WIDTHS):
    """(name, kernel, constants, warps) of the on-chip kernels at each padded width, with and
    without the one-step-ahead loads."""
    from rnnkit.kernels.gpu import gru, lstm, rnn

    base = {"REVERSE": False, "SAVE": True, "PRECISION": "tf32", "SPLIT": True, "RELU": False}
    base |= {"DROPOUT": False, "ZONEOUT": 0, "ZONEOUT_C": 0, "BLOCK_B": 16, "BLOCK_N": 32}
    kernels = [
        ("rnn resident forward", rnn.rnn_resident_forward_kernel),
        ("rnn resident backward", rnn.rnn_resident_backward_kernel),
        ("lstm slice forward", lstm.lstm_slice_forward_kernel),
        ("lstm slice backward", lstm.lstm_slice_backward_kernel),
        ("gru slice forward", gru.gru_slice_forward_kernel),
        ("gru slice backward", gru.gru_slice_backward_kernel),
    ]
    for name, kernel in kernels:
        for width in widths:
            if name.startswith("rnn") and width > 128:
                continue  # float32 W_hh past 128 x 128 does not fit the resident kernels
            prefetches = (False, True) if "PREFETCH" in kernel.arg_names else (None,)
            for prefetch in prefetches:
                constants = base | {"BLOCK_H": width, "PREFETCH": prefetch}
                warps = 8 if name.startswith("rnn") and width >= 128 else 4
                yield name, kernel, constants, warps


def resources(kernel, constants: dict, warps: int) -> dict:
    """{"registers", "stack"} of one compiled variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {k: v for k, v in constants.items() if k in kernel.arg_names and v is not None}
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in ("lengths_ptr", "counter_ptr") else "*fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(
        ASTSource(kernel, signature, constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps},
    )
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {usage[-500:]}")
    return {"registers": int(found[1]), "stack": int(found[2])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--widths", default=",".join(map(str, WIDTHS)), help="padded hidden widths (BLOCK_H)"
    )
    args = parser.parse_args(argv)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        parser.error(f"--widths: comma-separated integers, got {args.widths!r}")
    if any(w < 16 or w & (w - 1) for w in widths):
        parser.error(f"--widths: powers of two of at least 16, got {args.widths!r}")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    print(
        f"{'kernel':22} {'BLOCK_H':>7} {'prefetch':>8} {'warps':>5} {'registers':>9} {'stack':>5}"
    )
    for name, kernel, constants, warps in variants(widths):
        usage = resources(kernel, constants, warps)
        prefetch = constants["PREFETCH"]
        rows.append(
            {"kernel": name, "block_h": constants["BLOCK_H"], "prefetch": prefetch}
            | {"warps": warps}
            | usage
        )
        shown = "-" if prefetch is None else str(prefetch)
        print(
            f"{name:22} {constants['BLOCK_H']:7} {shown:>8} {warps:5} "
            f"{usage['registers']:9} {usage['stack']:5}",
            flush=True,
        )
    write_json(args.json, {"target": "sm_90", "dtype": "float32", "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
