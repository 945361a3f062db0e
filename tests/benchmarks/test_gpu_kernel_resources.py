"""benchmarks/gpu_kernel_resources.py: compiles the on-chip kernels for sm_90 and reads their
registers and stack from the cubin (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_kernel_resources.py"


def run(*arguments: str) -> subprocess.CompletedProcess:
    # A process of its own: this one may hold interpreted kernels (test_interpreter.py).
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


@pytest.mark.slow
def test_reports_registers_and_stack_of_every_on_chip_kernel(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the gpu kernels cannot be compiled")
    result = run("--widths", "64", "--json", str(tmp_path / "out.json"))
    if result.returncode != 0 and "No such file" in result.stderr:
        pytest.skip("this triton wheel ships no cuobjdump or ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert {row["kernel"] for row in rows} == {
        f"{cell} {kind}" for cell in ("rnn resident", "lstm slice", "gru slice")
        for kind in ("forward", "backward")
    }  # fmt: skip
    assert all(row["block_h"] == 64 and 0 < row["registers"] <= 255 for row in rows)
    assert all(row["stack"] >= 0 for row in rows)


def test_widths_must_be_powers_of_two():
    result = run("--widths", "64,100")
    assert result.returncode != 0
    assert "--widths: powers of two of at least 16, got '64,100'" in result.stderr
    result = run("--widths", "64,x")
    assert result.returncode != 0
    assert "--widths: comma-separated integers, got '64,x'" in result.stderr
