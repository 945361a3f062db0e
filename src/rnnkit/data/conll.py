"""Token-tagged sentences from CoNLL-U files and from column (CoNLL / IOB2) files.

CoNLL-U: ten tab-separated columns per word (ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS
MISC), `#` comment lines, a blank line after each sentence. Multiword-token lines (ID `1-2`)
and empty nodes (ID `8.1`) are checked and skipped: the words carry the tags.

Column files: one token per line, a blank line between sentences, `#` comment lines allowed.
Fields are tab-separated when the line holds a tab, else whitespace-separated. The first token
line fixes the layout for the whole file: two fields are `token tag`; three or more with an
integer first field are `index token tag ...` (Universal NER); three or more otherwise are
`token ... tag` (CoNLL-2003: the tag is the last column).

Every problem raises DataError naming the file and line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rnnkit.data._files import base_suffix, existing_file, iter_lines
from rnnkit.data.builtin import builtin_file
from rnnkit.data.errors import DataError

CONLLU_TAG_COLUMNS = {"upos": 3, "xpos": 4}
CONLLU_SUFFIXES = (".conllu",)
UD_EWT_SPLITS = ("train", "dev", "test")
UNER_EWT_SPLITS = ("dev", "test")
_WORD_ID = re.compile(r"[1-9][0-9]*")
_RANGE_ID = re.compile(r"([1-9][0-9]*)-([1-9][0-9]*)")
_EMPTY_ID = re.compile(r"(0|[1-9][0-9]*)\.([1-9][0-9]*)")


@dataclass
class TaggedSentences:
    """Parallel lists: sentence i has tokens[i] and one tag per token in tags[i]."""

    tokens: list[list[str]]
    tags: list[list[str]]
    source: str = ""
    lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.tags):
            raise ValueError(
                f"TaggedSentences: tokens and tags must hold as many sentences, got "
                f"{len(self.tokens)} and {len(self.tags)}"
            )
        for index, (words, labels) in enumerate(zip(self.tokens, self.tags)):
            if len(words) != len(labels):
                where = f"{self.source}: line {self.lines[index]}: " if self.lines else ""
                raise DataError(
                    f"{where}sentence {index + 1} has {len(words)} tokens but {len(labels)} tags"
                )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def tagset(self) -> list[str]:
        """The distinct tags, sorted."""
        return sorted({tag for sentence in self.tags for tag in sentence})

    def subset(self, indices) -> TaggedSentences:
        """The sentences at `indices`, in that order."""
        indices = [int(i) for i in indices]
        lines = [self.lines[i] for i in indices] if self.lines else []
        return TaggedSentences(
            [self.tokens[i] for i in indices], [self.tags[i] for i in indices], self.source, lines
        )


def read_conllu(path: str | os.PathLike, tag_column: str = "upos") -> TaggedSentences:
    """CoNLL-U file (optionally .gz) -> its words and their UPOS (or XPOS) tags."""
    if tag_column not in CONLLU_TAG_COLUMNS:
        raise ValueError(
            f"tag_column must be one of {tuple(CONLLU_TAG_COLUMNS)}, got {tag_column!r}"
        )
    file = existing_file(path)
    column = CONLLU_TAG_COLUMNS[tag_column]
    tokens, tags, lines = [], [], []
    for start, rows in _blocks(file):
        words, labels = [], []
        for line_number, fields in rows:
            where = f"{file}: line {line_number}"
            if len(fields) != 10:
                raise DataError(
                    f"{where} has {len(fields)} tab-separated column(s), expected CoNLL-U's 10"
                )
            word_id = fields[0]
            if _RANGE_ID.fullmatch(word_id):
                first, last = map(int, _RANGE_ID.fullmatch(word_id).groups())
                if first > last or first != len(words) + 1:
                    raise DataError(
                        f"{where}: multiword token ID {word_id!r} must span the next words "
                        f"{len(words) + 1}-N"
                    )
                continue
            if _EMPTY_ID.fullmatch(word_id):
                if int(_EMPTY_ID.fullmatch(word_id).group(1)) != len(words):
                    raise DataError(
                        f"{where}: empty node ID {word_id!r} must follow word {len(words)}"
                    )
                continue
            if not _WORD_ID.fullmatch(word_id):
                raise DataError(
                    f"{where}: malformed ID {word_id!r}; expected a word number, a range "
                    "such as 1-2, or an empty node such as 8.1"
                )
            if int(word_id) != len(words) + 1:
                raise DataError(
                    f"{where}: word ID {word_id} out of order, expected {len(words) + 1}"
                )
            form, tag = fields[1], fields[column]
            if not form:
                raise DataError(f"{where}: empty FORM")
            if tag in ("", "_"):
                raise DataError(f"{where}: word {form!r} has no {tag_column.upper()} tag ({tag!r})")
            words.append(form)
            labels.append(tag)
        if not words:
            raise DataError(f"{file}: line {start}: a sentence without any word line")
        tokens.append(words)
        tags.append(labels)
        lines.append(start)
    if not tokens:
        raise DataError(f"{file}: contains no sentences (only comments or blank lines)")
    return TaggedSentences(tokens, tags, str(file), lines)


def read_column_file(path: str | os.PathLike) -> TaggedSentences:
    """Column file (token tag / index token tag ... / token ... tag; optionally .gz) -> sentences."""
    file = existing_file(path)
    layout: tuple[int, int, int, bool] | None = None  # fields, token column, tag column, index
    first_line = 0
    tokens, tags, lines = [], [], []
    for start, rows in _blocks(file, tabs_only=False):
        words, labels = [], []
        for line_number, fields in rows:
            where = f"{file}: line {line_number}"
            if layout is None:
                layout, first_line = _column_layout(fields, where), line_number
            count, token_column, tag_column, indexed = layout
            if len(fields) != count:
                hint = " (a token without its tag?)" if len(fields) < count else ""
                raise DataError(
                    f"{where} has {len(fields)} field(s), expected {count} like line "
                    f"{first_line}{hint}"
                )
            if indexed and fields[0] != str(len(words) + 1):
                raise DataError(
                    f"{where}: token index {fields[0]!r} out of order, expected {len(words) + 1}"
                )
            tag = fields[tag_column]
            if not tag:
                raise DataError(f"{where}: empty tag")
            words.append(fields[token_column])
            labels.append(tag)
        tokens.append(words)
        tags.append(labels)
        lines.append(start)
    if not tokens:
        raise DataError(f"{file}: contains no sentences (only comments or blank lines)")
    return TaggedSentences(tokens, tags, str(file), lines)


def load_tagged_file(path: str | os.PathLike, tag_column: str = "upos") -> TaggedSentences:
    """A user's file by extension: `.conllu` (optionally .gz) is CoNLL-U, anything else columns."""
    file = existing_file(path)
    if base_suffix(file) in CONLLU_SUFFIXES:
        return read_conllu(file, tag_column)
    return read_column_file(file)


def load_ud_english_ewt(split: str = "train", tag_column: str = "upos") -> TaggedSentences:
    """The shipped UD English-EWT treebank split ('train', 'dev', 'test') with gold UPOS/XPOS."""
    if split not in UD_EWT_SPLITS:
        raise ValueError(f"split must be one of {UD_EWT_SPLITS}, got {split!r}")
    return read_conllu(builtin_file(f"en_ewt-ud-{split}.conllu.gz"), tag_column)


def load_uner_english_ewt(split: str = "dev") -> TaggedSentences:
    """The shipped Universal NER English-EWT split ('dev', 'test'): IOB2 PER/ORG/LOC tags."""
    if split not in UNER_EWT_SPLITS:
        raise ValueError(f"split must be one of {UNER_EWT_SPLITS}, got {split!r}")
    return read_column_file(builtin_file(f"uner_en_ewt-{split}.iob2.gz"))


def _column_layout(fields: list[str], where: str) -> tuple[int, int, int, bool]:
    if len(fields) < 2:
        raise DataError(
            f"{where} has {len(fields)} field, expected a token and its tag (at least 2)"
        )
    if len(fields) == 2:
        return 2, 0, 1, False
    if fields[0].isdigit():
        return len(fields), 1, 2, True
    return len(fields), 0, len(fields) - 1, False


def _blocks(file: Path, tabs_only: bool = True) -> Iterator[tuple[int, list[tuple[int, list]]]]:
    """(first line number, [(line number, fields)]) per sentence; comments and blanks dropped."""
    rows: list[tuple[int, list[str]]] = []
    start = 0
    for line_number, line in enumerate(iter_lines(file), start=1):
        text = line.rstrip("\r\n")
        if not text.strip():
            if rows:
                yield start, rows
                rows = []
            continue
        if text.startswith("#") and not rows:
            continue  # comments come before a sentence; a later "#" is a token
        if tabs_only or "\t" in text:
            fields = text.split("\t")
        else:
            fields = text.split()
        if not rows:
            start = line_number
        rows.append((line_number, fields))
    if rows:
        yield start, rows
