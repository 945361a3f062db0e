"""The tagging application: spans and metrics, the baseline, encoding, runs and the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rnnkit.cli import main
from rnnkit.data import TaggedSentences
from rnnkit.data.conll import read_conllu
from rnnkit.train.rundir import RunError
from rnnkit.train.runs import evaluate_run, load_run, train_run
from rnnkit.train.tag import (
    TagSettings,
    TokenEncoder,
    entity_spans,
    most_frequent_tag_baseline,
    span_scores,
    tag_texts,
    tagging_metrics,
    tokenize,
)

TINY = {"hidden": 8, "embedding_dim": 8, "char_channels": 4, "batch_size": 4, "max_steps": 3}
TINY_CLI = ["--hidden", "8", "--max-steps", "3", "--batch-size", "4", "--quiet"]


# -- spans and metrics ------------------------------------------------------------------------
def test_entity_spans_follow_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "B-PER"]
    assert entity_spans(tags) == [
        ("PER", 0, 2),
        ("LOC", 3, 5),  # I- after O starts an entity
        ("LOC", 5, 6),
        ("ORG", 6, 7),  # I- of another type starts a new one
        ("PER", 7, 8),  # an entity at the very end is closed
    ]
    assert entity_spans(["S-PER", "B-LOC", "E-LOC", "I-LOC"]) == [
        ("PER", 0, 1),
        ("LOC", 1, 3),
        ("LOC", 3, 4),
    ]
    assert entity_spans(["O", "O"]) == []


def test_span_scores_count_exact_type_and_boundaries():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-PER"]]
    # gold 3 entities; predicted 4, of which LOC and ORG are exactly right
    scores = span_scores(gold, predicted)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_metrics_report_spans_only_for_entity_tags():
    pos = tagging_metrics([["NOUN", "VERB"]], [["NOUN", "NOUN"]], [[False, True]])
    assert pos == {"accuracy": 0.5, "unknown_word_accuracy": 0.0}
    ner = tagging_metrics([["B-PER", "O"]], [["B-PER", "O"]])
    assert ner["accuracy"] == 1.0 and ner["f1"] == 1.0


def test_baseline_uses_each_words_commonest_tag_then_the_commonest_overall():
    train = TaggedSentences(
        [["run", "run", "run", "the"], ["the", "dog"]],
        [["VERB", "NOUN", "VERB", "DET"], ["DET", "NOUN"]],
    )
    test = TaggedSentences([["the", "run", "cat"]], [["DET", "NOUN", "NOUN"]])
    # DET and NOUN are equally common; Counter keeps the first seen (VERB 2, DET 2, NOUN 2)
    assert most_frequent_tag_baseline(train, test) == [["DET", "VERB", "VERB"]]


def test_tokenize_splits_punctuation_and_clitics_as_ud_does():
    assert tokenize("I don't know, it's 3.5 km!") == [
        "I", "do", "n't", "know", ",", "it", "'s", "3.5", "km", "!",
    ]  # fmt: skip


def test_token_encoder_keeps_prefix_and_suffix_and_round_trips():
    train = TaggedSentences([["Walking", "walking", "2024"], ["x"]], [["A", "B", "A"], ["B"]])
    encoder = TokenEncoder.build(train, max_word_length=4, min_count=2)
    assert encoder.words == ["walking"] and encoder.knows("WALKING")
    assert encoder.knows("1999") is False
    ids = encoder.encode(["Walking", "zz"])
    assert ids.shape == (2, 5)
    assert encoder.chars.decode(ids[0, 1:]) == "Wang"  # "Wa" + "ng"
    assert ids[1, 0] == 1 and list(ids[1, 3:]) == [0, 0]
    again = TokenEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    assert np.array_equal(again.encode(["Walking", "zz"]), ids)


def test_settings_refuse_an_unknown_tagset():
    with pytest.raises(RunError, match="--tagset"):
        TagSettings(tagset="chunks")


# -- runs -------------------------------------------------------------------------------------
WORDS = {
    "DET": ["the", "a", "this"],
    "NOUN": ["dog", "cat", "house", "tree"],
    "VERB": ["sees", "likes", "finds"],
}


def conllu_text(sentences: int) -> str:
    rng = np.random.default_rng(0)
    blocks = []
    for index in range(sentences):
        pattern = ["DET", "NOUN", "VERB", "DET", "NOUN"]
        lines = [f"# sent_id = {index + 1}"]
        for position, tag in enumerate(pattern, start=1):
            word = rng.choice(WORDS[tag])
            lines.append(f"{position}\t{word}\t{word}\t{tag}\t{tag[:2]}\t_\t0\tdep\t_\t_")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


@pytest.fixture(scope="module")
def conllu_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.conllu"
    path.write_text(conllu_text(40))
    return path


@pytest.fixture(scope="module")
def ner_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.iob2"
    sentences = ["Anna\tB-PER\nvisits\tO\nParis\tB-LOC\n", "New\tB-LOC\nYork\tI-LOC\nwaits\tO\n"]
    path.write_text("\n".join(sentences * 15))
    return path


@pytest.fixture(scope="module")
def tag_run(tmp_path_factory, conllu_file):
    out = tmp_path_factory.mktemp("runs") / "tag"
    options = {"data": str(conllu_file), "bidirectional": False, **TINY}
    summary = train_run("tag", options, out=out, progress=False)
    return out, summary


def test_train_run_writes_a_complete_tagging_run(tag_run):
    out, summary = tag_run
    for name in ("config.json", "model.safetensors", "vocab.json", "metrics.json", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion.png").is_file()
    assert summary["steps"] == 3
    assert summary["baseline"]["name"] == "most frequent tag per word"
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    # The toy words are unambiguous: the baseline tags every test word right.
    assert summary["baseline"]["accuracy"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "tag" and config["model"]["class"] == "SequenceTagger"


def test_a_loaded_run_tags_text_and_evaluates(tag_run, conllu_file):
    out, summary = tag_run
    run = load_run(out, expect="tag")
    tagged = tag_texts(run.model, run.state, ["the dog sees a cat.", "   "])
    assert [token for token, _ in tagged[0]] == ["the", "dog", "sees", "a", "cat", "."]
    assert {tag for _, tag in tagged[0]} <= {"DET", "NOUN", "VERB"}
    assert tagged[1] == []
    again = evaluate_run(out)
    assert again["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    everything = evaluate_run(out, str(conllu_file))
    assert everything["sentences"] == len(read_conllu(conllu_file))


def test_resume_continues_a_tagging_run(tag_run, tmp_path):
    out, _ = tag_run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    summary = train_run("tag", {"max_steps": 5}, resume=copy, progress=False)
    assert summary["steps"] == 5


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_trains_predicts_and_evaluates_entity_tags(ner_file, tmp_path):
    out = tmp_path / "ner"
    result = run_cli(
        "train", "tag", "--data", ner_file, "--tagset", "ner", "--crf", "--out", out, *TINY_CLI
    )
    assert result.exit_code == 0, result.output
    assert "baseline (most frequent tag per word)" in result.output and "f1" in result.output
    predicted = run_cli("predict", out, "Anna visits New York", "Paris")
    assert predicted.exit_code == 0, predicted.output
    lines = predicted.output.strip().splitlines()
    assert lines[0].startswith("Anna/") and lines[0].split()[-1].startswith("York/")
    assert lines[1].startswith("Paris/")
    evaluated = run_cli("eval", out)
    assert evaluated.exit_code == 0, evaluated.output
    figures = json.loads(evaluated.output)
    assert figures["task"] == "tag" and {"accuracy", "precision", "recall", "f1"} <= set(figures)


def test_cli_names_the_file_and_line_of_a_bad_file(tmp_path):
    path = tmp_path / "bad.iob2"
    path.write_text("Anna B-PER\nvisits\nParis B-LOC\n")
    result = run_cli("train", "tag", "--data", path, "--out", tmp_path / "out", *TINY_CLI)
    assert result.exit_code == 2
    assert f"{path}: line 2 has 1 field" in result.output


def test_cli_refuses_entity_tags_from_a_conllu_file(conllu_file, tmp_path):
    result = run_cli(
        "train", "tag", "--data", conllu_file, "--tagset", "ner", "--out", tmp_path / "o"
    )
    assert result.exit_code == 2 and "has no entity tags" in result.output


def test_export_refuses_a_tagging_run_with_a_usage_error(tag_run, tmp_path):
    run_dir, _ = tag_run
    result = run_cli("export", run_dir, "--onnx", tmp_path / "tagger.onnx")
    assert result.exit_code == 2
    assert "train tag" in result.output and "ONNX export covers" in result.output
    assert not (tmp_path / "tagger.onnx").exists()
