"""Interrupted training loses nothing: SIGKILL mid-epoch and mid-checkpoint, then --resume.

A tiny forecasting run (sunspots, 12 steps per epoch, 3 epochs) is trained once without
interruption in this process, and once in subprocesses that are killed with SIGKILL: first
in the middle of the second epoch (after step 18; the last checkpoint is step 12's), then,
resumed, in the middle of writing step 24's checkpoint (its tensors written to the temporary
file, not yet renamed), and once more between writing step 24's files and pointing latest.json
at them. A last --resume (in this process) finishes the run. The final weights and metrics must
equal the uninterrupted run's bit for bit, and at every kill point every file in the run
directory must be whole (JSON parses, safetensors loads), temporary files aside.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rnnkit.cli import main
from rnnkit.train.checkpoint import FAULT_PAUSE_ENV, load_checkpoint

TRAIN = ["train", "forecast", "--hidden", "4", "--epochs", "3", "--batch-size", "16", "--quiet"]
# Wall-clock figures of a run: they differ between any two runs.
TIMINGS = ("seconds", "tokens_per_second")


def start(args: list[str], pause: str) -> subprocess.Popen:
    """`python -m rnnkit ARGS` that will stop at the fault point `pause` and wait to be killed."""
    env = dict(os.environ, **{FAULT_PAUSE_ENV: pause})
    return subprocess.Popen(
        [sys.executable, "-m", "rnnkit", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def kill_when_paused(process: subprocess.Popen, point: str, timeout: float = 240) -> None:
    """Wait until the process says it paused at `point`, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if f"paused at {point}".encode() in seen:
                process.send_signal(signal.SIGKILL)
                process.wait()
                assert process.returncode == -signal.SIGKILL
                return
    process.kill()
    process.wait()
    raise AssertionError(f"the run never paused at {point}; stderr:\n{seen.decode()}")


def assert_every_file_whole(run_dir: Path) -> list[Path]:
    """Every JSON file parses and every safetensors file loads; returns the temporary files."""
    temporaries = []
    for path in sorted(run_dir.rglob("*")):
        if path.is_dir():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            temporaries.append(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            assert load_file(path)
        else:
            assert path.suffix == ".png" and path.read_bytes().startswith(b"\x89PNG"), path
    return temporaries


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMINGS} for record in history]


def test_killed_mid_epoch_and_mid_checkpoint_then_resumed_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "uninterrupted"
    result = CliRunner().invoke(main, [*TRAIN, "--out", str(reference)])
    assert result.exit_code == 0, result.output

    run_dir = tmp_path / "killed"
    first = start([*TRAIN, "--out", str(run_dir)], "step:18")
    kill_when_paused(first, "step:18")
    assert assert_every_file_whole(run_dir) == []
    assert load_checkpoint(run_dir / "checkpoint").state.step == 12  # steps 13-18 are lost
    assert not (run_dir / "model.safetensors").exists()

    second = start([*TRAIN[:2], "--resume", str(run_dir), "--quiet"], "checkpoint-rename:24")
    kill_when_paused(second, "checkpoint-rename:24")
    temporaries = assert_every_file_whole(run_dir)
    assert [p.name.startswith(".tensors.safetensors.") for p in temporaries] == [True]
    assert load_checkpoint(run_dir / "checkpoint").state.step == 12  # step 24 never completed

    third = start([*TRAIN[:2], "--resume", str(run_dir), "--quiet"], "checkpoint-latest:24")
    kill_when_paused(third, "checkpoint-latest:24")
    assert assert_every_file_whole(run_dir) == []
    # Step 24's files are whole but latest.json still names step 12: resuming starts there.
    assert (run_dir / "checkpoint" / "step-00000024").is_dir()
    assert load_checkpoint(run_dir / "checkpoint").state.step == 12

    final = CliRunner().invoke(main, [*TRAIN[:2], "--resume", str(run_dir), "--quiet"])
    assert final.exit_code == 0, final.output
    assert assert_every_file_whole(run_dir) == []

    ours, theirs = (
        load_file(run_dir / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert without_timings(metrics.pop("history")) == without_timings(expected.pop("history"))
    metrics.pop("run_dir"), expected.pop("run_dir")
    assert metrics == expected
    assert metrics["steps"] == 36
