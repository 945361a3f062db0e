from fractions import Fraction

import pytest

from rnnkit.data import load_chorales, parse_note_token, write_midi


def test_embedded_chorales_are_note_token_lists():
    chorales = load_chorales()
    assert len(chorales) == 371
    assert chorales[0][:5] == ["67:1", "67:2", "74:1", "71:1.5", "69:0.5"]  # BWV 269
    lengths = [len(tokens) for tokens in chorales]
    assert min(lengths) > 10
    pitches = []
    for tokens in chorales:
        for token in tokens:
            pitch, duration = parse_note_token(token)
            assert duration > 0
            if pitch is not None:
                pitches.append(pitch)
    # soprano lines stay in the soprano range
    assert 55 <= min(pitches) and max(pitches) <= 84


def test_parse_note_token():
    assert parse_note_token("67:1.5") == (67, Fraction(3, 2))
    assert parse_note_token("rest:1/3") == (None, Fraction(1, 3))
    for bad in ["67", "C4:1", "67:0", "67:x", "200:1", "rest:1:2"]:
        with pytest.raises(ValueError):
            parse_note_token(bad)


def test_write_midi_round_trip(tmp_path):
    mido = pytest.importorskip("mido")
    tokens = ["60:1", "rest:0.5", "64:0.5", "67:2"]
    path = write_midi(tokens, tmp_path / "tune.mid", tempo_bpm=120)
    midi = mido.MidiFile(path)
    assert midi.ticks_per_beat == 480
    notes_on = [m for m in midi.tracks[0] if m.type == "note_on"]
    assert [m.note for m in notes_on] == [60, 64, 67]
    # 4 quarter notes in total at 120 bpm = 2 seconds
    assert midi.length == pytest.approx(2.0)
    # the half-quarter rest shows as the second note's delay after the first note ends
    assert notes_on[1].time == 240


def test_write_midi_names_the_bad_token(tmp_path):
    pytest.importorskip("mido")
    with pytest.raises(ValueError, match=r"tokens\[1\]"):
        write_midi(["60:1", "oops"], tmp_path / "bad.mid")
    assert not list(tmp_path.iterdir())
