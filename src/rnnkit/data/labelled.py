"""Labelled texts for classification, from CSV, TSV, JSON Lines or JSON files."""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rnnkit.data._files import base_suffix, existing_file, iter_lines
from rnnkit.data.builtin import builtin_file
from rnnkit.data.errors import DataError

LABELLED_FORMATS = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class LabelledTexts:
    """Parallel lists: texts[i] carries labels[i]."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        """The distinct labels, sorted."""
        return sorted(set(self.labels))


def load_labelled_texts(
    path: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> LabelledTexts:
    """CSV/TSV/JSONL/JSON file (optionally .gz) -> LabelledTexts; None -> embedded surnames.

    The format comes from the extension. CSV and TSV need a header row naming the columns;
    JSONL has one object per line; JSON is a list of objects (or JSON Lines). Labels are
    returned as strings.
    """
    for name, value in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    if text_column == label_column:
        raise ValueError(f"text_column and label_column must differ, both are {text_column!r}")
    file = builtin_file("surnames.tsv.gz") if path is None else existing_file(path)
    suffix = base_suffix(file)
    if suffix not in LABELLED_FORMATS:
        raise DataError(
            f"{file}: unknown format {suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(LABELLED_FORMATS)} (optionally + .gz)"
        )
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(file, "\t" if suffix == ".tsv" else ",", text_column, label_column)
    else:
        rows = _json_rows(file, text_column, label_column)
    texts, labels = [], []
    for place, text, label in rows:
        if not text.strip():
            raise DataError(f"{file}: {place}: empty {text_column!r}")
        if not label.strip():
            raise DataError(f"{file}: {place}: empty {label_column!r}")
        texts.append(text)
        labels.append(label.strip())
    if not texts:
        raise DataError(f"{file}: contains no labelled rows")
    classes = set(labels)
    if len(classes) < 2:
        raise DataError(
            f"{file}: column {label_column!r} has a single class {labels[0]!r}; "
            "classification needs at least 2 classes"
        )
    return LabelledTexts(texts=texts, labels=labels)


def _csv_rows(
    file: Path, delimiter: str, text_column: str, label_column: str
) -> Iterator[tuple[str, str, str]]:
    reader = csv.reader(iter_lines(file), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise DataError(f"{file}: no header row; the file is empty or blank")
        columns = [cell.strip() for cell in header]
        missing = [name for name in (text_column, label_column) if name not in columns]
        if missing:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise DataError(
                f"{file}: missing column(s) {', '.join(map(repr, missing))}; "
                f"the {kind} header has: {', '.join(map(repr, columns))}"
            )
        text_index, label_index = columns.index(text_column), columns.index(label_column)
        needed = max(text_index, label_index) + 1
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < needed:
                raise DataError(
                    f"{file}: line {reader.line_num} has {len(row)} field(s), expected at least "
                    f"{needed} (header has {len(columns)})"
                )
            yield f"line {reader.line_num}", row[text_index], row[label_index]
    except csv.Error as error:
        raise DataError(f"{file}: line {reader.line_num}: malformed CSV ({error})") from None


def _json_rows(file: Path, text_column: str, label_column: str) -> Iterator[tuple[str, str, str]]:
    for place, record in _json_records(file):
        where = f"{file}: {place}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [name for name in (text_column, label_column) if name not in record]
        if missing:
            raise DataError(
                f"{where}: missing key(s) {', '.join(map(repr, missing))}; "
                f"the object has: {', '.join(map(repr, record)) or 'no keys'}"
            )
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str):
            raise DataError(f"{where}: {text_column!r} must be a string, got {text!r}")
        if not isinstance(label, str | int):
            raise DataError(f"{where}: {label_column!r} must be a string or integer, got {label!r}")
        yield place, text, str(label)


def _json_records(file: Path) -> Iterator[tuple[str, object]]:
    """("line N" or "record N", parsed value) for JSON Lines or a JSON list of objects."""
    lines = iter_lines(file)
    skipped = 0  # blank lines before the first content line
    first = next(lines, "")
    while first and not first.strip():
        skipped += 1
        first = next(lines, "")
    if not first.strip():
        raise DataError(f"{file}: contains only whitespace, expected JSON")
    if first.lstrip().startswith("["):
        # A JSON list has to be parsed whole; JSON Lines below stays streamed.
        content = "\n" * skipped + first + "".join(lines)
        try:
            records = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}: invalid JSON at line {error.lineno}: {error.msg}") from None
        for index, record in enumerate(records, start=1):
            yield f"record {index}", record
        return
    for line_number, line in enumerate(itertools.chain([first], lines), start=skipped + 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}: line {line_number} is not valid JSON ({error.msg})") from None
        yield f"line {line_number}", record
