"""The command line: exit codes, messages, --force, and each command on tiny data."""

import json
import math
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from rnnkit.cli import main

TINY = ["--hidden", "8", "--max-steps", "2", "--quiet", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pets.csv"
    rows = ["text,label"] + [
        f"{w}{i},{lab}" for i in range(12) for w, lab in (("cat", "a"), ("dog", "b"))
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("to be or not to be, that is the question.\n" * 40)
    return path


@pytest.fixture(scope="module")
def series_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "wave.csv"
    rows = ["year,value"] + [f"{1900 + t},{math.sin(t / 2):.4f}" for t in range(80)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, labelled_file):
    out = tmp_path_factory.mktemp("runs") / "classify"
    result = run("train", "classify", "--data", labelled_file, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "lm"
    result = run("train", "lm", "--data", text_file, "--out", out, "--seq-len", "8", *TINY)
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["train"],
        ["train", "classify"],
        ["train", "lm"],
        ["train", "forecast"],
        ["train", "music"],
        ["eval"],
        ["predict"],
        ["generate"],
        ["forecast"],
        ["warmup"],
        ["experiment"],
    ],
)
def test_help_everywhere(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "rnnkit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "train" in result.stdout


def test_train_classify_writes_a_complete_run(classify_run):
    out, result = classify_run
    for name in (
        "config.json",
        "model.safetensors",
        "vocab.json",
        "metrics.json",
        "curves.png",
        "confusion.png",
        "checkpoint/latest.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "classify" and config["model"]["class"] == "SequenceClassifier"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "majority class" in metrics["baseline"]["name"]
    assert "baseline (majority class)" in result.output


def test_an_existing_run_is_not_overwritten_without_force(classify_run, labelled_file):
    out, _ = classify_run
    before = (out / "model.safetensors").read_bytes()
    result = run("train", "classify", "--data", labelled_file, "--out", out, *TINY)
    assert result.exit_code == 2
    assert "already holds a run" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.output
    assert (out / "model.safetensors").read_bytes() == before


def test_force_replaces_the_run(tmp_path, labelled_file):
    out = tmp_path / "run"
    assert run("train", "classify", "--data", labelled_file, "--out", out, *TINY).exit_code == 0
    (out / "forecast.png").write_bytes(b"stale")
    args = ("train", "classify", "--data", labelled_file, "--out", out, "--seed", "3", *TINY)
    result = run(*args, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "forecast.png").exists()
    assert json.loads((out / "config.json").read_text())["settings"]["seed"] == 3


def test_predict_and_eval_use_the_saved_run(classify_run):
    out, _ = classify_run
    result = run("predict", out, "cat99", "dog7")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("a", "b") for line in lines)
    evaluated = run("eval", out)
    assert evaluated.exit_code == 0, evaluated.output
    saved = json.loads((out / "metrics.json").read_text())["test"]
    assert json.loads(evaluated.output)["accuracy"] == pytest.approx(saved["accuracy"])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "empty"),
        ("text,label\nonly,one\nagain,one\n", "single class"),
        ("words,kind\na,b\nc,d\n", "text"),
    ],
)
def test_bad_classification_data_exits_2(tmp_path, content, message):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    result = run("train", "classify", "--data", path, "--out", tmp_path / "out", *TINY)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("rnnkit: error:")
    assert message in result.stderr.lower()
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_binary_file_is_rejected_for_lm(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(bytes(range(256)) * 4)
    result = run("train", "lm", "--data", path, "--out", tmp_path / "out", *TINY)
    assert result.exit_code == 2, result.output
    assert str(path) in result.stderr


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_train_uses_torchs_threads_unless_told(tmp_path, text_file, threads):
    # The fused kernels run parts of a batch on torch's threads, so training leaves torch's
    # default (OMP_NUM_THREADS, or a thread per core) alone unless --threads is given.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        told = [] if threads is None else ["--threads", threads]
        out = tmp_path / "lm"
        options = ["--data", text_file, "--out", out, "--seq-len", "8", *TINY, *told]
        result = run("train", "lm", *options)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == (2 if threads is None else threads)
    finally:
        torch.set_num_threads(previous)  # the tests after this one keep their threads


def test_generate_and_eval_lm(lm_run):
    out, result = lm_run
    assert "bits_per_char" in result.output and "unigram" in result.output
    generated = run("generate", out, "--prompt", "to be", "--length", "20", "--top-k", "3")
    assert generated.exit_code == 0, generated.output
    assert generated.output.startswith("to be") and len(generated.output.rstrip("\n")) == 25
    evaluated = json.loads(run("eval", out).output)
    saved = json.loads((out / "metrics.json").read_text())["test"]["bits_per_char"]
    assert evaluated["bits_per_char"] == pytest.approx(saved, rel=1e-6)


def test_resume_continues_a_run_to_more_steps(lm_run, tmp_path):
    out, _ = lm_run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    result = run("train", "lm", "--resume", copy, "--max-steps", "4", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["steps"] == 4
    changed = run("train", "lm", "--resume", copy, "--hidden", "16", "--quiet")
    assert changed.exit_code == 2 and "only --epochs and --max-steps" in changed.stderr


def test_commands_refuse_the_wrong_kind_of_run(lm_run, tmp_path):
    out, _ = lm_run
    result = run("predict", out, "hello")
    assert result.exit_code == 2 and "`lm` run" in result.stderr
    missing = run("eval", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


@pytest.fixture(scope="module")
def music_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "music"
    result = run("train", "music", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    return out, result


def test_music_run_writes_a_sample_and_generate_writes_midi(music_run, tmp_path):
    import mido

    out, result = music_run
    assert "generated notes" in result.output and "bits_per_token" in result.output
    assert "unigram" in result.output and (out / "sample.mid").is_file()
    midi = tmp_path / "piece.mid"
    generated = run("generate", out, "--midi", midi, "--length", "20", "--prompt", "67:1 69:1")
    assert generated.exit_code == 0, generated.output
    tokens = generated.stdout.split()
    assert tokens[:2] == ["67:1", "69:1"] and len(tokens) <= 22
    played = [m.note for m in mido.MidiFile(midi) if m.type == "note_on"]
    assert played == [int(t.split(":")[0]) for t in tokens if not t.startswith("rest")]
    again = run("generate", out, "--midi", midi)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert run("generate", out, "--midi", midi, "--force").exit_code == 0
    bad = run("generate", out, "--prompt", "C4:1")
    assert bad.exit_code == 2 and "C4:1" in bad.stderr


def test_midi_needs_a_music_run(lm_run, music_run, tmp_path):
    result = run("generate", lm_run[0], "--midi", tmp_path / "x.mid")
    assert result.exit_code == 2 and "needs a `music` run" in result.stderr
    assert not (tmp_path / "x.mid").exists()
    wrong = run("predict", music_run[0], "hello")
    assert wrong.exit_code == 2 and "`music` run" in wrong.stderr


def test_forecast_train_and_forecast_future(tmp_path, series_file):
    out = tmp_path / "forecast"
    args = ("train", "forecast", "--data", series_file, "--out", out, "--horizon", "4")
    result = run(*args, "--window", "8", *TINY)
    assert result.exit_code == 0, result.output
    assert "seasonal naive" in result.output
    assert (out / "forecast.png").is_file()
    future = run("forecast", out, "--horizon", "6")
    assert future.exit_code == 0, future.output
    assert len(future.stdout.strip().splitlines()) == 7
    assert (out / "forecast_future.png").is_file()


def test_unexpected_failures_exit_1_without_traceback(monkeypatch, tmp_path):
    import rnnkit.train.runs

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rnnkit.train.runs, "train_run", broken)
    result = run("train", "lm", "--out", tmp_path / "x", "--quiet")
    assert result.exit_code == 1
    assert "RuntimeError: boom" in result.stderr and "Traceback" not in result.output


def test_unknown_experiment_exits_2():
    pytest.importorskip("rnnkit.experiments")
    result = run("experiment", "no-such-experiment")
    assert result.exit_code == 2 and "no-such-experiment" in result.stderr
