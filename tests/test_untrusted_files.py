"""Untrusted files: run directories, checkpoints, torch .pt files and data files that are
truncated, corrupted, mismatched or hostile give a clear error (exit 2), never a crash."""

from __future__ import annotations

import os
import pickle
import random
import resource
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rnnkit
import rnnkit.data._files
from rnnkit.cli import main
from rnnkit.convert import load_torch_state_dict
from rnnkit.data import DataError, load_labelled_texts, load_series, load_text
from rnnkit.train.rundir import RunError
from rnnkit.train.runs import load_run

TINY = ["--hidden", "4", "--max-steps", "3", "--batch-size", "16", "--quiet"]
RUN_FILES = ["config.json", "model.safetensors", "preprocessing.json"]
CHECKPOINT_FILES = ["latest.json", "state.json", "tensors.safetensors"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "forecast"
    result = invoke("train", "forecast", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def locate(run_dir: Path, name: str) -> Path:
    if name in RUN_FILES:
        return run_dir / name
    if name == "latest.json":
        return run_dir / "checkpoint" / name
    return next((run_dir / "checkpoint").glob(f"step-*/{name}"))


def reader_of(run_dir: Path, name: str):
    """The command that reads this file: eval for the run's files, --resume for checkpoints."""
    if name in RUN_FILES:
        return invoke("eval", run_dir)
    return invoke("train", "forecast", "--resume", run_dir, "--quiet")


@pytest.mark.parametrize("name", RUN_FILES + CHECKPOINT_FILES)
def test_a_truncated_file_is_a_clear_error_naming_it(finished_run, tmp_path, name):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    path = locate(run_dir, name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = reader_of(run_dir, name)
    assert result.exit_code == 2, result.output
    assert name in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("name", RUN_FILES + CHECKPOINT_FILES)
def test_flipped_bytes_never_crash(finished_run, tmp_path, name):
    rng = random.Random(name)
    for trial in range(3):
        run_dir = tmp_path / f"copy{trial}"
        shutil.copytree(finished_run, run_dir)
        path = locate(run_dir, name)
        data = bytearray(path.read_bytes())
        for _ in range(3):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        result = reader_of(run_dir, name)
        # A flip that leaves a valid file (a digit in a number) may go unnoticed: exit 0.
        assert result.exit_code in (0, 2), (trial, result.output)
        assert "Traceback" not in result.output and "unexpected" not in result.output


def test_checkpoint_tensors_are_checked_against_their_recorded_hash(finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    path = locate(run_dir, "tensors.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a weight's last bit: still a valid safetensors file
    path.write_bytes(bytes(data))
    result = reader_of(run_dir, "tensors.safetensors")
    assert result.exit_code == 2 and "SHA-256" in result.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("head.weight"), "missing"),
        (lambda w: w.update(extra=torch.zeros(2)), "unexpected"),
        (lambda w: w.update({"head.weight": torch.zeros(3, 3)}), "head.weight"),
        (lambda w: w.update({k: v.double() for k, v in w.items()}), "float64"),
    ],
)
def test_weights_are_validated_against_the_config(finished_run, tmp_path, change, message):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    weights = load_file(run_dir / "model.safetensors")
    assert "head.weight" in weights
    change(weights)
    save_file(weights, run_dir / "model.safetensors")
    with pytest.raises(RunError, match=message):
        load_run(run_dir)


def test_runs_and_checkpoints_load_without_unpickling(finished_run, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    assert invoke("eval", run_dir).exit_code == 0
    result = invoke("train", "forecast", "--resume", run_dir, "--max-steps", "4", "--quiet")
    assert result.exit_code == 0, result.output


# -- torch.save files ------------------------------------------------------------------------
@pytest.fixture
def torch_lstm_file(tmp_path) -> tuple[torch.nn.LSTM, Path]:
    torch.manual_seed(0)
    layer = torch.nn.LSTM(3, 5, num_layers=2)
    path = tmp_path / "lstm.pt"
    torch.save(layer.state_dict(), path)
    return layer, path


def test_a_pt_file_is_refused_without_trust_pickle(torch_lstm_file, tmp_path):
    _, path = torch_lstm_file
    with pytest.raises(DataError, match="pickle.*trust_pickle=True"):
        load_torch_state_dict(path)
    result = invoke("import-torch", path, "--out", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "--trust-pickle" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_import_torch_with_trust_pickle_gives_weights_rnnkit_loads(torch_lstm_file, tmp_path):
    layer, path = torch_lstm_file
    out = tmp_path / "lstm.safetensors"
    result = invoke("import-torch", path, "--out", out, "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "weight_ih_l1\t(20, 5)\tfloat32" in result.stdout
    ours = rnnkit.LSTM(3, 5, num_layers=2)
    ours.load_state_dict(load_torch_state_dict(out))  # safetensors: no pickle, no flag
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours(x)[0], layer(x)[0])


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_trusted_pickle_still_refuses_code_and_non_state_dicts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"weight": RunsCode()}))
    with pytest.raises(DataError, match="not a readable torch.save file"):
        load_torch_state_dict(hostile, trust_pickle=True)
    assert not (tmp_path / "PWNED").exists()
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    result = invoke(
        "import-torch", truncated, "--out", tmp_path / "o.safetensors", "--trust-pickle"
    )
    assert result.exit_code == 2 and "truncated.pt" in result.stderr
    plain = tmp_path / "plain.pt"
    torch.save([1, 2], plain)
    with pytest.raises(DataError, match="expected a non-empty state_dict"):
        load_torch_state_dict(plain, trust_pickle=True)


# -- data files --------------------------------------------------------------------------------
def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\nok,a\ncaf\xe9,b\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3 is not valid UTF-8 \(byte 0xe9"):
        load_labelled_texts(path)


def test_a_line_over_the_limit_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(rnnkit.data._files, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.txt"
    path.write_text("short line\n" + "x" * 1000 + "\n" + "y" * 1001 + "\n")
    with pytest.raises(DataError, match="long.txt: line 3 is longer than 1,000 bytes"):
        load_text(path)


def test_a_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(rnnkit.data._files, "MAX_FILE_BYTES", 10_000)
    path = tmp_path / "big.csv"
    path.write_text("value\n" + "1.5\n" * 5000)
    with pytest.raises(DataError, match="big.csv: more than 0 MiB of text"):
        load_series(path)


def test_a_huge_file_without_line_breaks_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "sparse.txt"
    with open(path, "wb") as handle:
        handle.truncate(3 * 2**30)  # 3 GiB of holes: no disk used
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="line 1 is longer than"):
        load_text(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024


def test_a_million_rows_stream_through(tmp_path):
    path = tmp_path / "long.csv"
    with open(path, "w") as handle:
        handle.write("value\n")
        handle.writelines(f"{i % 97}\n" for i in range(1_000_000))
    series = load_series(path)
    assert series.values.shape == (1_000_000, 1)
