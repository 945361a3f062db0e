"""Source -> target pairs for sequence-to-sequence tasks, and the vocabularies of their sides.

The shipped set is CMUdict grapheme -> phoneme (`load_pairs(None)`): 114,591 English words of
2-12 letters, each with its first listed pronunciation as ARPAbet phonemes with stress digits
("cat" -> "K AE1 T"). Users' files hold one pair per line, `source<TAB>target` (UTF-8,
optionally .gz); blank lines are skipped.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np

from rnnkit.data._files import existing_file, iter_lines
from rnnkit.data.batching import split_indices
from rnnkit.data.builtin import builtin_file
from rnnkit.data.errors import DataError

CMUDICT_FILE = "cmudict.tsv.gz"
TOKEN_LEVELS = ("char", "space")
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass
class Pairs:
    """Parallel lists: sources[i] is transduced to targets[i]."""

    sources: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, indices: Iterable[int]) -> Pairs:
        """The pairs at `indices`, in that order."""
        indices = [int(i) for i in indices]
        return Pairs([self.sources[i] for i in indices], [self.targets[i] for i in indices])


def load_pairs(path: str | os.PathLike | None = None) -> Pairs:
    """A `source<TAB>target` file (optionally .gz) -> Pairs; None -> the shipped CMUdict set.

    DataError, naming the file and line, for a line without exactly one tab, a pair with an
    empty side, invalid UTF-8, or a file with no pairs.
    """
    file = builtin_file(CMUDICT_FILE) if path is None else existing_file(path)
    sources, targets = [], []
    for line_number, line in enumerate(iter_lines(file), start=1):
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{file}: line {line_number} has {len(fields) - 1} tab(s), expected exactly one "
                f"between source and target: {_shown(text)}"
            )
        source, target = fields[0].strip(), fields[1].strip()
        for side, value in (("source", source), ("target", target)):
            if not value:
                raise DataError(f"{file}: line {line_number}: empty {side}: {_shown(text)}")
        sources.append(source)
        targets.append(target)
    if not sources:
        raise DataError(f"{file}: contains no pairs (only blank lines)")
    return Pairs(sources, targets)


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def split_pairs(
    pairs: Pairs, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) index arrays, split by distinct source so no source is in two splits.

    The same pairs and seed give the same split; fractions count distinct sources.
    """
    first_seen: dict[str, int] = {}
    groups: list[list[int]] = []
    for index, source in enumerate(pairs.sources):
        if source not in first_seen:
            first_seen[source] = len(groups)
            groups.append([])
        groups[first_seen[source]].append(index)
    parts = split_indices(len(groups), fractions, seed)
    return tuple(
        np.array([i for group in part for i in groups[group]], dtype=np.int64) for part in parts
    )


class TokenVocab:
    """Tokens of one side: characters ("char") or space-separated tokens ("space").

    Ids: <pad>=0, <unk>=1, <s>=2, </s>=3, then the tokens sorted.
    """

    specials = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

    def __init__(self, tokens: Iterable[str], level: str) -> None:
        if level not in TOKEN_LEVELS:
            raise ValueError(f"level must be one of {TOKEN_LEVELS}, got {level!r}")
        self.level = level
        self._tokens = [*self.specials, *tokens]
        self._ids = {token: index for index, token in enumerate(self._tokens)}
        if len(self._ids) != len(self._tokens):
            repeated = sorted(t for t, c in Counter(self._tokens).items() if c > 1)
            raise DataError(f"TokenVocab: repeated or reserved tokens {repeated[:5]!r}")

    @classmethod
    def build(cls, texts: Iterable[str], level: str) -> Self:
        """Texts -> a vocabulary of every token in them."""
        if level not in TOKEN_LEVELS:
            raise ValueError(f"level must be one of {TOKEN_LEVELS}, got {level!r}")
        seen: set[str] = set()
        for text in texts:
            seen.update(tokenize(text, level))
        return cls(sorted(seen - set(cls.specials)), level)

    @property
    def tokens(self) -> list[str]:
        """Every token in id order, the four special ones first."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TokenVocab)
            and other.level == self.level
            and other._tokens == self._tokens
        )

    def __repr__(self) -> str:
        return f"TokenVocab(size={len(self)}, level={self.level!r})"

    def encode(self, text: str) -> list[int]:
        """Text -> one id per token (unknown tokens -> 1), without <s> or </s>."""
        ids = self._ids
        return [ids.get(token, UNK_ID) for token in tokenize(text, self.level)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, joined as the level splits; <pad>, <s>, </s> are dropped."""
        tokens = []
        for raw in ids:
            index = int(raw)
            if not 0 <= index < len(self._tokens):
                raise ValueError(f"id {index} is outside the vocabulary (0..{len(self) - 1})")
            if index not in (PAD_ID, BOS_ID, EOS_ID):
                tokens.append(self._tokens[index])
        return join_tokens(tokens, self.level)

    def to_dict(self) -> dict:
        """JSON-ready description that from_dict restores exactly."""
        return {"type": "TokenVocab", "level": self.level, "tokens": self._tokens[4:]}

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        """to_dict output -> vocabulary; DataError if the content is not such a description."""
        if not isinstance(data, dict) or data.get("type") != "TokenVocab":
            raise DataError(
                f"TokenVocab.from_dict: expected a TokenVocab description, got {data!r}"
            )
        tokens, level = data.get("tokens"), data.get("level")
        if level not in TOKEN_LEVELS:
            raise DataError(f"TokenVocab.from_dict: 'level' must be one of {TOKEN_LEVELS}")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise DataError("TokenVocab.from_dict: 'tokens' must be a list of non-empty strings")
        return cls(tokens, level)


def tokenize(text: str, level: str) -> list[str]:
    """Text -> its characters ("char") or its space-separated tokens ("space")."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return list(text) if level == "char" else text.split()


def join_tokens(tokens: Sequence[str], level: str) -> str:
    """The inverse of tokenize (runs of spaces become one)."""
    return "".join(tokens) if level == "char" else " ".join(tokens)
