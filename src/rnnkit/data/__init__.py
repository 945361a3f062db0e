"""Data: sets shipped with the package, readers for users' files, vocabularies and batching."""

from rnnkit.data.batching import pad_batch, split_indices
from rnnkit.data.builtin import BUILTIN_DATASETS, BuiltinDataset
from rnnkit.data.chorales import load_chorales, parse_note_token, write_midi
from rnnkit.data.conll import (
    TaggedSentences,
    load_tagged_file,
    load_ud_english_ewt,
    load_uner_english_ewt,
    read_column_file,
    read_conllu,
)
from rnnkit.data.digits import load_digit_sequences
from rnnkit.data.errors import DataError
from rnnkit.data.labelled import LabelledTexts, load_labelled_texts
from rnnkit.data.pairs import Pairs, TokenVocab, load_pairs, split_pairs
from rnnkit.data.series import BUILTIN_SERIES, Series, load_series
from rnnkit.data.text import load_text
from rnnkit.data.vocab import PAD_ID, UNK_ID, CharVocab, WordVocab

__all__ = [
    "DataError",
    "load_text",
    "LabelledTexts",
    "load_labelled_texts",
    "TaggedSentences",
    "read_conllu",
    "read_column_file",
    "load_tagged_file",
    "load_ud_english_ewt",
    "load_uner_english_ewt",
    "Pairs",
    "load_pairs",
    "split_pairs",
    "TokenVocab",
    "load_digit_sequences",
    "Series",
    "load_series",
    "BUILTIN_SERIES",
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "split_indices",
    "CharVocab",
    "WordVocab",
    "PAD_ID",
    "UNK_ID",
    "pad_batch",
    "load_chorales",
    "parse_note_token",
    "write_midi",
]
