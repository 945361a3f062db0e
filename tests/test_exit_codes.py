"""Exit codes: 0 success, 2 usage or input errors (one line on stderr, no traceback unless
--debug), 1 unexpected failures; through CliRunner and through real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rnnkit.convert
from rnnkit.cli import main


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"weight_ih_l0": torch.zeros(4, 2)}, path)
    return path


@pytest.fixture
def broken_import(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rnnkit.convert, "load_torch_state_dict", broken)


def test_success_exits_0(weights_file, tmp_path):
    result = invoke("import-torch", weights_file, "--out", tmp_path / "copy.safetensors")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "copy.safetensors").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["train", "forecast", "--hidden", "0"],
        ["train", "forecast", "--on-nan", "ignore"],
        ["import-torch", "x.pt"],  # --out missing
    ],
)
def test_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Usage:" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "{tmp}/missing-run"], "does not exist"),
        (["train", "lm", "--data", "{tmp}/missing.txt", "--quiet"], "no such file"),
        (["import-torch", "{tmp}/w.pt", "--out", "{tmp}/o.safetensors"], "no such file"),
        (["import-torch", "{weights}", "--out", "{tmp}"], "must be a file"),
    ],
)
def test_input_errors_exit_2_with_one_line_on_stderr(tmp_path, weights_file, args, message):
    args = [a.format(tmp=tmp_path, weights=weights_file) for a in args]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("rnnkit: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_debug_shows_the_traceback_of_an_input_error(tmp_path):
    result = invoke("--debug", "eval", tmp_path / "missing-run")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "RunError" in result.stderr


def test_unexpected_failures_exit_1_and_debug_shows_why(broken_import, tmp_path):
    args = ["import-torch", tmp_path / "w.pt", "--out", tmp_path / "o.safetensors"]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "unexpected RuntimeError: boom (--debug shows the traceback)" in result.stderr
    assert "Traceback" not in result.output
    assert "Traceback" in invoke("--debug", *args).stderr
    assert "Traceback" in invoke(*args, env={"RNNKIT_DEBUG": "1"}).stderr


PATCHED_MAIN = textwrap.dedent(
    """
    import sys
    import rnnkit.convert
    from rnnkit.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    if sys.argv[1] == "break":
        rnnkit.convert.load_torch_state_dict = broken
    main(sys.argv[2:], prog_name="rnnkit")
    """
)


# Exit 0 through a real process: tests/test_cli.py::test_python_dash_m_runs_the_cli.
@pytest.mark.parametrize(
    "mode, args, code, shown",
    [
        ("ok", ["import-torch", "{tmp}/w.pt", "--out", "{tmp}/o.safetensors"], 2, "no such file"),
        ("break", ["--debug", "import-torch", "x", "--out", "{tmp}/o"], 1, "Traceback"),
    ],
)
def test_real_process_exit_codes(tmp_path, weights_file, mode, args, code, shown):
    args = [a.format(tmp=tmp_path, weights=weights_file) for a in args]
    done = subprocess.run(
        [sys.executable, "-c", PATCHED_MAIN, mode, *args], capture_output=True, text=True
    )
    assert done.returncode == code, done.stderr
    assert shown in done.stderr
    assert ("Traceback" in done.stderr) == (code == 1)
