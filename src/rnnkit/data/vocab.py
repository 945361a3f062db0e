"""Character and word vocabularies: id 0 is padding, id 1 stands for anything unknown."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Self

from rnnkit.data.errors import DataError

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
# Decoding an unknown id in a character vocabulary gives the Unicode replacement character.
UNKNOWN_CHAR = "\ufffd"
_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


class _Vocab:
    """Shared token <-> id bookkeeping; subclasses say how text becomes tokens."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [PAD_TOKEN, UNK_TOKEN, *tokens]
        self._ids = {token: index for index, token in enumerate(self._tokens)}
        if len(self._ids) != len(self._tokens):
            raise DataError(f"{type(self).__name__}: tokens repeat")

    @staticmethod
    def _as_text_list(texts: Iterable[str] | str) -> Iterable[str]:
        return [texts] if isinstance(texts, str) else texts

    @staticmethod
    def _check_min_count(min_count: int) -> None:
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")

    @property
    def tokens(self) -> list[str]:
        """Every token in id order, the two special ones first."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._tokens == self._tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={len(self)})"

    def _ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        tokens = []
        for position, raw in enumerate(ids):
            index = int(raw)
            if not 0 <= index < len(self._tokens):
                raise ValueError(
                    f"ids[{position}] = {index} is outside the vocabulary (0..{len(self) - 1})"
                )
            if index != PAD_ID:
                tokens.append(self._tokens[index])
        return tokens

    def to_dict(self) -> dict:
        """JSON-serialisable description that from_dict restores exactly."""
        return {"type": type(self).__name__, "tokens": self._tokens[2:]}

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        """to_dict output -> vocabulary; DataError if the content is not such a description."""
        if not isinstance(data, dict):
            raise DataError(f"{cls.__name__}.from_dict: expected a dict, got {type(data).__name__}")
        if data.get("type") != cls.__name__:
            raise DataError(
                f"{cls.__name__}.from_dict: 'type' is {data.get('type')!r}, expected {cls.__name__!r}"
            )
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise DataError(
                f"{cls.__name__}.from_dict: 'tokens' must be a list of non-empty strings"
            )
        if PAD_TOKEN in tokens or UNK_TOKEN in tokens:
            raise DataError(
                f"{cls.__name__}.from_dict: 'tokens' must not hold {PAD_TOKEN}/{UNK_TOKEN}"
            )
        cls._check_tokens(tokens)
        if len(set(tokens)) != len(tokens):
            repeated = sorted(t for t, c in Counter(tokens).items() if c > 1)
            raise DataError(f"{cls.__name__}.from_dict: repeated tokens {repeated[:5]!r}")
        return cls(tokens)

    @classmethod
    def _check_tokens(cls, tokens: list[str]) -> None:
        pass


class CharVocab(_Vocab):
    """One id per character, sorted by code point after <pad>=0 and <unk>=1."""

    @classmethod
    def build(cls, texts: Iterable[str] | str, min_count: int = 1) -> Self:
        """Texts (a str counts as one text) -> vocabulary of characters seen >= min_count times."""
        cls._check_min_count(min_count)
        counts: Counter[str] = Counter()
        for index, text in enumerate(cls._as_text_list(texts)):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
            counts.update(text)
        return cls(sorted(char for char, count in counts.items() if count >= min_count))

    @classmethod
    def _check_tokens(cls, tokens: list[str]) -> None:
        long = [t for t in tokens if len(t) != 1]
        if long:
            raise DataError(
                f"CharVocab.from_dict: tokens must be single characters, got {long[:5]!r}"
            )

    def encode(self, text: str) -> list[int]:
        """Text -> one id per character (unknown characters -> 1)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._ids
        return [ids.get(char, UNK_ID) for char in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; padding is dropped and <unk> becomes U+FFFD."""
        return "".join(UNKNOWN_CHAR if t == UNK_TOKEN else t for t in self._ids_to_tokens(ids))


class WordVocab(_Vocab):
    """One id per lower-cased word or punctuation mark, most frequent first after <pad>, <unk>."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Text -> lower-cased words (letters, digits, inner apostrophes) and punctuation marks."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return _WORD.findall(text.lower())

    @classmethod
    def build(
        cls, texts: Iterable[str] | str, min_count: int = 1, max_size: int | None = None
    ) -> Self:
        """Texts -> vocabulary of words seen >= min_count times; max_size caps len(vocab)."""
        cls._check_min_count(min_count)
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 2
        ):
            raise ValueError(f"max_size must be None or an int >= 2, got {max_size!r}")
        counts: Counter[str] = Counter()
        for index, text in enumerate(cls._as_text_list(texts)):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
            counts.update(cls.tokenize(text))
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            kept = kept[: max_size - 2]
        return cls(kept)

    def encode(self, text: str) -> list[int]:
        """Text -> one id per token of tokenize(text) (unknown words -> 1)."""
        ids = self._ids
        return [ids.get(token, UNK_ID) for token in self.tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> tokens joined by spaces; padding is dropped, unknown words show as <unk>."""
        return " ".join(self._ids_to_tokens(ids))
