"""The seq2seq application: a run end to end, the CLI (train, predict, eval, resume), scores."""

import json

import pytest
import torch
from click.testing import CliRunner

from rnnkit.cli import main
from rnnkit.data import Pairs
from rnnkit.data import pairs as pairs_ids
from rnnkit.models import seq2seq as model_ids
from rnnkit.train.runs import train_run
from rnnkit.train.seq2seq import (
    Seq2SeqSettings,
    Seq2SeqTask,
    copy_baseline,
    edit_distance,
    transduction_scores,
)

TINY = {"hidden": 8, "embedding_dim": 8, "max_steps": 3, "batch_size": 4, "beam": 2}
TINY_CLI = ["--hidden", "8", "--max-steps", "2", "--batch-size", "4", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Words and their letters reversed, space-separated: 'abc' -> 'C B A'."""
    words = [a + b + c for a in "abcde" for b in "fgh" for c in "ijkl"]
    path = tmp_path_factory.mktemp("data") / "reverse.tsv"
    path.write_text("".join(f"{w}\t{' '.join(reversed(w.upper()))}\n" for w in words))
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, pairs_file):
    out = tmp_path_factory.mktemp("runs") / "seq2seq"
    result = run(
        "train", "seq2seq", "--data", pairs_file, "--out", out, "--attention", "luong-general",
        "--beam", "2", *TINY_CLI,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, result


def test_train_run_writes_a_complete_run(tmp_path, pairs_file):
    out = tmp_path / "run"
    summary = train_run("seq2seq", {"data": str(pairs_file), **TINY}, out=out, progress=False)
    for name in ("config.json", "model.safetensors", "vocab.json", "metrics.json", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "attention.png").read_bytes().startswith(PNG_MAGIC)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["class"] == "Seq2Seq"
    assert config["model"]["config"]["attention"] == "bahdanau"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    for key in ("exact_match", "token_error_rate", "chrf", "bleu"):
        assert 0 <= metrics["test"][key] <= (1 if key == "exact_match" else 100)
    assert metrics["test"]["examples"] == 6
    assert metrics["baseline"]["name"] == "copy the input"
    assert metrics["decoding"] == {"beam": 2, "length_penalty": 0.6}
    assert summary["test"] == metrics["test"]


def test_cli_train_predict_with_beam_and_attention_png(cli_run, tmp_path):
    out, result = cli_run
    assert "test: exact_match" in result.output and "baseline (copy the input)" in result.output
    png = tmp_path / "attention.png"
    predicted = run("predict", out, "abc", "egk", "--beam", "3", "--attention", png)
    assert predicted.exit_code == 0, predicted.output
    lines = predicted.output.strip().splitlines()
    assert [line.split("\t")[-1] for line in lines] == ["abc", "egk"]
    assert png.read_bytes().startswith(PNG_MAGIC)
    missing_dir = run("predict", out, "abc", "--attention", tmp_path / "no" / "a.png")
    assert missing_dir.exit_code == 2 and "does not exist" in missing_dir.output


def test_cli_eval_reports_scores_and_the_copy_baseline(cli_run, pairs_file):
    out, _ = cli_run
    result = run("eval", out)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["task"] == "seq2seq" and scores["examples"] == 6
    assert {"exact_match", "token_error_rate", "chrf", "bleu"} <= set(scores)
    on_file = json.loads(run("eval", out, "--data", pairs_file).output)
    assert on_file["examples"] == 60


def test_cli_resume_continues_to_more_steps(cli_run):
    out, _ = cli_run
    result = run("train", "seq2seq", "--resume", out, "--max-steps", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    changed = run("train", "seq2seq", "--resume", out, "--attention", "bahdanau", "--quiet")
    assert changed.exit_code == 2 and "--attention" in changed.output


@pytest.mark.parametrize(
    "content, message",
    [
        ("cat\tK AE T\ndog D AO G\n", "line 2 has 0 tab(s)"),
        ("cat\tK AE T\n\tX\n", "line 2: empty source"),
    ],
)
def test_bad_pairs_file_exits_2_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    result = run("train", "seq2seq", "--data", path, "--out", tmp_path / "run", *TINY_CLI)
    assert result.exit_code == 2
    assert f"{path}: {message}" in result.output


def test_bad_options_are_refused_before_training():
    with pytest.raises(Exception, match="--teacher-forcing-end must be in"):
        Seq2SeqSettings(teacher_forcing_end=1.5)
    with pytest.raises(Exception, match="--attention must be one of"):
        Seq2SeqSettings(attention="dot")


def test_scores_of_perfect_and_wrong_outputs():
    # BLEU counts up to 4-grams: references of 4 tokens and more.
    references = ["K AE1 T S", "D AO1 G Z", "B ER1 D Z"]
    perfect = transduction_scores(references, references, "space")
    assert perfect == pytest.approx(
        {"exact_match": 1.0, "token_error_rate": 0.0, "chrf": 100.0, "bleu": 100.0}
    )
    # Case is folded; one token substituted in one of 9 reference tokens.
    wrong = transduction_scores(["k ae1 t s", "D AO1 G Z", "B ER1 T Z"], references, "space")
    assert wrong["exact_match"] == pytest.approx(2 / 3)
    assert wrong["token_error_rate"] == pytest.approx(1 / 12)
    assert 0 < wrong["bleu"] < 100 and 0 < wrong["chrf"] < 100
    assert edit_distance(list("kitten"), list("sitting")) == 3


def test_copy_baseline_is_perfect_on_an_identity_task():
    pairs = Pairs(["abc", "de"], ["a b c", "d e"])
    state = {"source": {"level": "char"}, "target": {"level": "space"}}
    assert copy_baseline(pairs, state)["exact_match"] == 1.0


def test_the_vocabulary_and_the_model_agree_on_special_ids():
    assert (pairs_ids.PAD_ID, pairs_ids.UNK_ID, pairs_ids.BOS_ID, pairs_ids.EOS_ID) == (
        model_ids.PAD_ID,
        model_ids.UNK_ID,
        model_ids.BOS_ID,
        model_ids.EOS_ID,
    )


def test_teacher_forcing_decays_linearly_over_the_run():
    task = Seq2SeqTask(None, None, {}, 4, 0, (1.0, 0.5), total_steps=11)
    assert [task.ratio_at(step) for step in (0, 5, 10, 20)] == [1.0, 0.75, 0.5, 0.5]


def test_predict_options_of_seq2seq_are_refused_for_a_classify_run(tmp_path):
    data = tmp_path / "pets.csv"
    data.write_text("text,label\n" + "".join(f"cat{i},a\ndog{i},b\n" for i in range(10)))
    out = tmp_path / "classify"
    trained = run("train", "classify", "--data", data, "--out", out, *TINY_CLI)
    assert trained.exit_code == 0, trained.output
    plain = run("predict", out, "cat3")
    assert plain.exit_code == 0 and plain.output.split("\t")[0] in ("a", "b")
    refused = run("predict", out, "cat3", "--beam", "2")
    assert refused.exit_code == 2 and "need a `seq2seq` run" in refused.output


def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(
    tmp_path, pairs_file, monkeypatch
):
    from safetensors.torch import load_file

    from rnnkit.train import runs
    from rnnkit.train.trainer import Trainer, TrainingInterrupted

    class StopAtStep2(Trainer):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.on_step = lambda trainer, step: step == 2 and trainer.request_stop()

    # Teacher forcing decays to 0.3, so sampled decoder inputs (and the RNG) are exercised.
    options = {"data": str(pairs_file), **TINY, "max_steps": 5, "teacher_forcing_end": 0.3}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_run("seq2seq", options, out=straight, progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(runs, "Trainer", StopAtStep2)
        with pytest.raises(TrainingInterrupted):
            train_run("seq2seq", options, out=split, progress=False)
    train_run("seq2seq", {}, resume=split, progress=False)
    expected = load_file(straight / "model.safetensors")
    resumed = load_file(split / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
