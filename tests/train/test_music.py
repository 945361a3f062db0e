"""Music generation: note vocabulary, piece streams, user files, training on the chorales, MIDI."""

import json

import mido
import pytest

from rnnkit.data import UNK_ID, DataError, load_chorales
from rnnkit.train.music import (
    PIECE_BREAK,
    NoteVocab,
    load_pieces,
    piece_stream,
    sample_piece,
    split_pieces,
)
from rnnkit.train.runs import evaluate_run, load_run, train_run


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A small model trained briefly on the shipped chorales (a few seconds)."""
    out = tmp_path_factory.mktemp("runs") / "music"
    options = {"hidden": 64, "max_steps": 60, "batch_size": 32, "learning_rate": 0.01}
    summary = train_run("music", options, out=out, progress=False)
    return out, summary


def test_note_vocab_keeps_whole_tokens_and_round_trips():
    vocab = NoteVocab.build([["67:1", "69:0.5", "67:1"], ["rest:1", "67:1"]])
    assert vocab.tokens[2:] == [PIECE_BREAK, "67:1", "69:0.5", "rest:1"]  # break, then by count
    ids = vocab.encode(["69:0.5", "60:4", "rest:1"])
    assert ids[1] == UNK_ID and vocab.decode(ids) == ["69:0.5", "<unk>", "rest:1"]
    assert NoteVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(DataError, match="C4:1"):
        NoteVocab.from_dict({"type": "NoteVocab", "tokens": [PIECE_BREAK, "C4:1"]})
    with pytest.raises(TypeError):
        vocab.encode("67:1")


def test_piece_stream_puts_a_break_before_each_piece_and_at_the_end():
    vocab = NoteVocab.build([["67:1", "69:1"], ["71:2"]])
    stream = vocab.decode(piece_stream(vocab, [["67:1", "69:1"], ["71:2"]]))
    assert stream == [PIECE_BREAK, "67:1", "69:1", PIECE_BREAK, "71:2", PIECE_BREAK]


def test_split_keeps_pieces_whole_and_depends_on_the_seed():
    pieces = load_chorales()
    train, valid, test = split_pieces(pieces, seed=0)
    assert (len(train), len(valid), len(test)) == (297, 37, 37)
    assert sorted(map(tuple, train + valid + test)) == sorted(map(tuple, pieces))
    assert split_pieces(pieces, seed=0)[2] == test and split_pieces(pieces, seed=1)[2] != test


def test_user_file_has_one_piece_per_line(tmp_path):
    path = tmp_path / "tunes.txt"
    path.write_text("67:1 69:0.5 rest:1\n\n72:2\n60:1/3 62:1/3 64:1/3\n")
    assert load_pieces(str(path)) == [
        ["67:1", "69:0.5", "rest:1"],
        ["72:2"],
        ["60:1/3", "62:1/3", "64:1/3"],
    ]
    path.write_text("67:1\n69:1 C4:1\n72:1\n")
    with pytest.raises(DataError, match="line 2"):
        load_pieces(str(path))
    path.write_text("67:1\n69:1\n")
    with pytest.raises(DataError, match="at least 3 pieces"):
        load_pieces(str(path))


def test_short_training_beats_the_unigram_baseline(short_run):
    out, summary = short_run
    test, baseline = summary["test"], summary["baseline"]
    assert test["bits_per_token"] < baseline["bits_per_token"] - 0.5
    assert test["perplexity"] == pytest.approx(2 ** test["bits_per_token"])
    valid = [record["valid_bits_per_token"] for record in summary["history"]]
    assert len(valid) >= 2 and valid[-1] < valid[0]
    assert json.loads((out / "vocab.json").read_text())["level"] == "note"


def test_the_sample_is_written_as_a_midi_file_that_reads_back(short_run):
    out, summary = short_run
    piece = summary["sample"].split()
    assert piece and PIECE_BREAK not in piece
    midi = mido.MidiFile(out / "sample.mid")
    played = [m.note for m in midi if m.type == "note_on"]
    expected = [int(token.split(":")[0]) for token in piece if not token.startswith("rest")]
    assert played == expected and played


def test_generation_continues_the_prompt_and_stops_at_a_piece_break(short_run):
    out, _ = short_run
    run = load_run(out, expect="music")
    vocab = NoteVocab.from_dict(run.state["vocab"])
    piece = sample_piece(run.model, vocab, ["67:1", "69:1"], 300, 1.0, 5, seed=3)
    assert piece[:2] == ["67:1", "69:1"] and PIECE_BREAK not in piece
    assert len(piece) < 302  # a trained model ends its piece well before 300 notes
    with pytest.raises(ValueError, match="not in the run's vocabulary"):
        sample_piece(run.model, vocab, ["67:7/5"], 5, 1.0, None, seed=0)


def test_eval_reproduces_the_test_figure(short_run):
    out, summary = short_run
    evaluated = evaluate_run(out)
    assert evaluated["task"] == "music"
    assert evaluated["bits_per_token"] == pytest.approx(summary["test"]["bits_per_token"])
    assert evaluated["unigram_bits_per_token"] == pytest.approx(
        summary["baseline"]["bits_per_token"]
    )
