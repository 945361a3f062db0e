"""Bach chorale melodies as note tokens, and writing token sequences to MIDI files."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from rnnkit.data.builtin import builtin_file
from rnnkit.io import atomic_path

TICKS_PER_QUARTER = 480
REST = "rest"


def load_chorales() -> list[list[str]]:
    """Embedded soprano lines of 371 Bach chorales -> one token list per chorale.

    A token is "<MIDI pitch>:<duration>" or "rest:<duration>", durations in quarter notes
    ("1", "0.5", "1/3"), e.g. ["67:1", "74:1", "71:1.5", "69:0.5"].
    """
    with gzip.open(builtin_file("chorales.json.gz"), "rt", encoding="utf-8") as handle:
        payload = json.load(handle)
    return [list(record["tokens"]) for record in payload["chorales"]]


def parse_note_token(token: str) -> tuple[int | None, Fraction]:
    """Note token -> (MIDI pitch or None for a rest, duration): "67:1.5" -> (67, Fraction(3, 2))."""
    if not isinstance(token, str) or token.count(":") != 1:
        raise ValueError(f"note token must look like '67:1.5' or 'rest:1', got {token!r}")
    pitch_text, duration_text = token.split(":")
    try:
        duration = Fraction(duration_text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"note token {token!r} has a bad duration {duration_text!r}") from None
    if duration <= 0:
        raise ValueError(f"note token {token!r} must have a positive duration")
    if pitch_text == REST:
        return None, duration
    if not pitch_text.isdigit() or not 0 <= int(pitch_text) <= 127:
        raise ValueError(f"note token {token!r} must have a MIDI pitch 0..127 or 'rest'")
    return int(pitch_text), duration


def write_midi(
    tokens: Sequence[str], path: str | os.PathLike, tempo_bpm: float = 90.0, program: int = 0
) -> Path:
    """Note tokens -> a one-track standard MIDI file at path (written atomically); returns the path.

    Needs the ``mido`` package. ``program`` is the General MIDI instrument (0 = piano).
    """
    try:
        import mido
    except ImportError:
        raise ImportError("write_midi needs the mido package: pip install mido") from None

    if isinstance(tokens, str):
        raise TypeError("tokens must be a list of note tokens, got a str")
    if not 0 < tempo_bpm <= 1000:
        raise ValueError(f"tempo_bpm must be in (0, 1000], got {tempo_bpm!r}")
    if isinstance(program, bool) or not isinstance(program, int) or not 0 <= program <= 127:
        raise ValueError(f"program must be an int in 0..127, got {program!r}")
    notes = []
    for index, token in enumerate(tokens):
        try:
            notes.append(parse_note_token(token))
        except ValueError as error:
            raise ValueError(f"tokens[{index}]: {error}") from None
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm), time=0))
    track.append(mido.Message("program_change", program=program, time=0))
    pending_rest = 0
    for pitch, duration in notes:
        ticks = round(duration * TICKS_PER_QUARTER)
        if pitch is None:
            pending_rest += ticks
            continue
        track.append(mido.Message("note_on", note=pitch, velocity=80, time=pending_rest))
        track.append(mido.Message("note_off", note=pitch, velocity=0, time=ticks))
        pending_rest = 0
    track.append(mido.MetaMessage("end_of_track", time=pending_rest))
    midi = mido.MidiFile(ticks_per_beat=TICKS_PER_QUARTER)
    midi.tracks.append(track)
    target = Path(path)
    # A MIDI file is meant to be shared: world-readable, unlike mkstemp's 0600.
    with (
        atomic_path(target, suffix=".mid", mode=0o644) as temporary,
        open(temporary, "wb") as handle,
    ):
        midi.save(file=handle)
    return target
