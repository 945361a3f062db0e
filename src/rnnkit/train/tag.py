"""Sequence tagging (aligned many-to-many): part-of-speech tags or named-entity (IOB2) tags.

Data: the shipped UD English-EWT treebank (`--tagset upos` or `xpos`: its own train/dev/test
files), the shipped Universal NER English-EWT annotations (`--tagset ner`: its dev file split
90/10 into train/valid, its test file for testing; the train file is not shipped), or a user's
CoNLL-U or column file (`--data PATH`, split 80/10/10 by sentence, shuffled, seeded).
Metrics: token accuracy, and for IOB tags span precision/recall/F1 (an entity counts when its
type and both boundaries match, as seqeval's default mode and conlleval count). Baseline: each
word's most frequent training tag, unknown words get the most frequent tag overall.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnkit.data import CharVocab, DataError, split_indices
from rnnkit.data.conll import (
    TaggedSentences,
    load_tagged_file,
    load_ud_english_ewt,
    load_uner_english_ewt,
)
from rnnkit.data.vocab import UNK_ID
from rnnkit.models.tagger import SequenceTagger, SequenceTaggerConfig
from rnnkit.train.checkpoint import Carry
from rnnkit.train.metrics import accuracy, confusion_matrix
from rnnkit.train.plots import plot_confusion_matrix
from rnnkit.train.rundir import RunError
from rnnkit.train.settings import Settings
from rnnkit.train.trainer import Batch, StepOutput

TAGSETS = ("upos", "xpos", "ner")
POS_EPOCHS, NER_EPOCHS = 5, 20
_DIGIT = re.compile(r"\d")
# Words and numbers (inner . , - kept), "n't" split from its verb as UD does, clitics, punctuation.
_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'\w+|\w+(?:[-.,]\w+)*|[^\w\s]")


@dataclass
class TagSettings(Settings):
    """Tagging options: which tags, the CRF, the word and character encoders."""

    tagset: str = "upos"
    crf: bool = False
    bidirectional: bool = True
    hidden: int = 128
    epochs: int | None = None
    batch_size: int = 32
    learning_rate: float = 3e-3
    embedding_dim: int = 100
    char_channels: int = 64
    dropout: float = 0.3
    max_word_length: int = 20
    max_train_sentences: int | None = None
    checkpoint_every: int | None = 100
    patience: int | None = 5

    def __post_init__(self) -> None:
        if self.epochs is None:
            # The shipped NER training set (1,801 sentences) is 7x smaller than the treebank's.
            self.epochs = NER_EPOCHS if self.tagset == "ner" else POS_EPOCHS
        super().__post_init__()
        if self.tagset not in TAGSETS:
            raise RunError(f"--tagset must be one of {TAGSETS}, got {self.tagset!r}")
        for name in ("embedding_dim", "char_channels", "max_word_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RunError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if self.max_train_sentences is not None and (
            not isinstance(self.max_train_sentences, int) or self.max_train_sentences < 1
        ):
            raise RunError(
                f"--max-train-sentences must be an int >= 1, got {self.max_train_sentences!r}"
            )


# -- spans and metrics ------------------------------------------------------------------------
def is_iob(tags: list[str]) -> bool:
    """True when every tag is O or a prefixed entity tag (B-X, I-X, E-X, S-X)."""
    return all(t == "O" or (len(t) > 2 and t[0] in "BIES" and t[1] == "-") for t in tags)


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """IOB2 (also IOB1/IOBES) tags -> (type, start, end) entities, end exclusive.

    As conlleval: an I-X after O or after another type starts an entity; an entity ends
    before O, B-, S-, a tag of another type, or after an E- or S- tag.
    """
    spans: list[tuple[str, int, int]] = []
    kind: str | None = None
    start = 0
    previous = "O"
    for index, tag in enumerate([*tags, "O"]):
        prefix, tag_kind = (tag[0], tag[2:]) if tag != "O" else ("O", "")
        if kind is not None and (prefix in "BSO" or tag_kind != kind or previous in "ES"):
            spans.append((kind, start, index))
            kind = None
        if prefix in "BS" or (prefix in "IE" and kind is None):
            kind, start = tag_kind, index
        previous = prefix
    return spans


def span_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 of predicted entities against gold, over all sentences."""
    gold_spans = {(i, *s) for i, tags in enumerate(gold) for s in entity_spans(tags)}
    found = {(i, *s) for i, tags in enumerate(predicted) for s in entity_spans(tags)}
    correct = len(gold_spans & found)
    precision = correct / len(found) if found else 0.0
    recall = correct / len(gold_spans) if gold_spans else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def tagging_metrics(
    gold: list[list[str]], predicted: list[list[str]], unknown: list[list[bool]] | None = None
) -> dict[str, float]:
    """Token accuracy (and on unknown words when `unknown` marks them); span scores for IOB."""
    flat_gold = np.array([t for tags in gold for t in tags])
    flat_predicted = np.array([t for tags in predicted for t in tags])
    metrics = {"accuracy": accuracy(flat_gold, flat_predicted)}
    if unknown is not None:
        mask = np.array([u for flags in unknown for u in flags], dtype=bool)
        if mask.any():
            metrics["unknown_word_accuracy"] = accuracy(flat_gold[mask], flat_predicted[mask])
    if is_iob(list(set(flat_gold))):
        metrics.update(span_scores(gold, predicted))
    return metrics


def most_frequent_tag_baseline(train: TaggedSentences, test: TaggedSentences) -> list[list[str]]:
    """Each test word's most frequent tag in train; words never seen get the commonest tag."""
    by_word: dict[str, Counter] = {}
    overall: Counter = Counter()
    for words, tags in zip(train.tokens, train.tags):
        for word, tag in zip(words, tags):
            by_word.setdefault(word, Counter())[tag] += 1
            overall[tag] += 1
    # Counter.most_common breaks ties by first insertion: deterministic for a given train set.
    best = {word: counts.most_common(1)[0][0] for word, counts in by_word.items()}
    default = overall.most_common(1)[0][0]
    return [[best.get(word, default) for word in words] for words in test.tokens]


# -- encoding: what vocab.json stores ---------------------------------------------------------
def normalise_word(word: str) -> str:
    """The word-embedding key: lower case, every digit 0 (the characters keep the rest)."""
    return _DIGIT.sub("0", word.lower())


def tokenize(text: str) -> list[str]:
    """Text -> tokens split on whitespace and punctuation, `n't` and clitics apart (as UD)."""
    return _TOKEN.findall(text)


@dataclass
class TokenEncoder:
    """Tokens -> (T, 1 + C) ids: the normalised word's id, then the characters' ids."""

    words: list[str]
    chars: CharVocab
    tags: list[str]
    max_word_length: int

    def __post_init__(self) -> None:
        self._word_ids = {word: index for index, word in enumerate(self.words, start=2)}
        self._tag_ids = {tag: index for index, tag in enumerate(self.tags)}

    @classmethod
    def build(
        cls, train: TaggedSentences, max_word_length: int, min_count: int = 2
    ) -> TokenEncoder:
        """Words seen >= min_count times in train (rarer ones are <unk>), all its characters."""
        counts = Counter(normalise_word(w) for words in train.tokens for w in words)
        words = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        chars = CharVocab.build([w for words_ in train.tokens for w in words_])
        return cls(words, chars, train.tagset, max_word_length)

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2

    def knows(self, word: str) -> bool:
        """Whether the word has its own embedding (else it is <unk>)."""
        return normalise_word(word) in self._word_ids

    def encode(self, tokens: list[str]) -> np.ndarray:
        """T tokens -> (T, 1 + C) int64; C is the longest word's length, at most max_word_length.

        A longer word keeps its first and last characters (prefixes and suffixes carry it).
        """
        limit = self.max_word_length
        width = min(limit, max(len(token) for token in tokens))
        ids = np.zeros((len(tokens), 1 + width), dtype=np.int64)
        for row, token in enumerate(tokens):
            ids[row, 0] = self._word_ids.get(normalise_word(token), UNK_ID)
            if len(token) > limit:
                token = token[: limit - limit // 2] + token[len(token) - limit // 2 :]
            ids[row, 1 : 1 + len(token)] = self.chars.encode(token)
        return ids

    def encode_tags(self, tags: list[str], source: str) -> np.ndarray:
        """Tag strings -> ids; DataError naming tags the model was not trained on."""
        try:
            return np.array([self._tag_ids[tag] for tag in tags], dtype=np.int64)
        except KeyError as error:
            raise DataError(
                f"{source}: tag {error.args[0]!r} is not among the trained tags {self.tags}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "words": self.words,
            "chars": self.chars.to_dict(),
            "tags": self.tags,
            "max_word_length": self.max_word_length,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TokenEncoder:
        return cls(
            list(state["words"]),
            CharVocab.from_dict(state["chars"]),
            list(state["tags"]),
            int(state["max_word_length"]),
        )


@dataclass
class Examples:
    """Encoded sentences: (T, 1 + C) token ids and (T,) tag ids each, with the sentences."""

    inputs: list[np.ndarray]
    tags: list[np.ndarray]
    sentences: TaggedSentences

    @classmethod
    def encode(cls, encoder: TokenEncoder, sentences: TaggedSentences) -> Examples:
        inputs = [encoder.encode(tokens) for tokens in sentences.tokens]
        tags = [encoder.encode_tags(t, sentences.source or "data") for t in sentences.tags]
        return cls(inputs, tags, sentences)

    def __len__(self) -> int:
        return len(self.inputs)


def make_batch(inputs: list[np.ndarray], tags: list[np.ndarray] | None = None) -> Batch:
    """Sentences -> ((B, T, 1 + C) ids, (B,) lengths, (B, T) tag ids) with zero padding."""
    lengths = torch.tensor([len(x) for x in inputs], dtype=torch.int64)
    width = max(x.shape[1] for x in inputs)
    padded = np.zeros((len(inputs), int(lengths.max()), width), dtype=np.int64)
    tag_ids = np.zeros(padded.shape[:2], dtype=np.int64)
    for row, x in enumerate(inputs):
        padded[row, : len(x), : x.shape[1]] = x
        if tags is not None:
            tag_ids[row, : len(x)] = tags[row]
    return torch.from_numpy(padded), lengths, torch.from_numpy(tag_ids)


def length_bucketed_batches(
    lengths: list[int], batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled full batches of indices, each from a pool sorted by length (less padding).

    The sentences left over after the last full batch wait for another epoch's order, so every
    batch splits evenly over torchrun processes.
    """
    order = rng.permutation(len(lengths))[: len(lengths) // batch_size * batch_size]
    pool = batch_size * 32
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [np.array(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class TaggingTask:
    """Length-bucketed shuffled batches of training sentences; validation accuracy or F1."""

    train: Examples
    valid: Examples
    encoder: TokenEncoder
    batch_size: int
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metric: str = "accuracy"
    higher_is_better: bool = True

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.batch_size)

    def batches(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        lengths = [len(x) for x in self.train.inputs]
        size = min(self.batch_size, len(self.train))
        for indices in length_bucketed_batches(lengths, size, rng):
            yield make_batch(
                [self.train.inputs[i] for i in indices], [self.train.tags[i] for i in indices]
            )

    def loss(self, model: nn.Module, batch: Batch, carry: Carry) -> StepOutput:
        inputs, lengths, tags = batch
        emissions = model(inputs, lengths)
        tagger = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        loss = tagger.neg_log_likelihood(emissions, tags, lengths)
        return StepOutput(loss, None, int(lengths.sum()))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_examples(model, self.valid, self.encoder, self.device)[0]


def predict_ids(model: SequenceTagger, inputs: list[np.ndarray], device, batch_size: int = 256):
    """Predicted tag-id arrays, one per sentence (batched by length, returned in input order)."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    predicted: list[np.ndarray | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch, lengths, _ = make_batch([inputs[i] for i in chunk])
        tags = model.tag(batch.to(device), lengths.to(device)).cpu().numpy()
        for row, index in enumerate(chunk):
            predicted[index] = tags[row, : int(lengths[row])]
    return predicted


def evaluate_examples(
    model: SequenceTagger, examples: Examples, encoder: TokenEncoder, device
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Token accuracy (all words, unknown words), span scores for IOB tags; predicted ids."""
    predicted = predict_ids(model, examples.inputs, device)
    names = [[encoder.tags[i] for i in ids] for ids in predicted]
    unknown = [[not encoder.knows(w) for w in words] for words in examples.sentences.tokens]
    return tagging_metrics(examples.sentences.tags, names, unknown), predicted


# -- data ---------------------------------------------------------------------------------------
def load_splits(settings: TagSettings) -> tuple[TaggedSentences, TaggedSentences, TaggedSentences]:
    """(train, valid, test) sentences for the settings' data and tag set."""
    if settings.data is None:
        if settings.tagset == "ner":
            labelled = load_uner_english_ewt("dev")
            train_index, valid_index, _ = split_indices(
                len(labelled), (0.9, 0.1, 0.0), settings.seed
            )
            train, valid = labelled.subset(train_index), labelled.subset(valid_index)
            test = load_uner_english_ewt("test")
        else:
            train = load_ud_english_ewt("train", settings.tagset)
            valid = load_ud_english_ewt("dev", settings.tagset)
            test = load_ud_english_ewt("test", settings.tagset)
    else:
        data = load_user_file(settings.data, settings.tagset)
        if len(data) < 3:
            raise DataError(f"{settings.data}: {len(data)} sentence(s); tagging needs at least 3")
        train_index, valid_index, test_index = split_indices(len(data), seed=settings.seed)
        train, valid, test = (data.subset(i) for i in (train_index, valid_index, test_index))
    if settings.max_train_sentences is not None:
        train = train.subset(range(min(len(train), settings.max_train_sentences)))
    return train, valid, test


def load_user_file(path: str, tagset: str) -> TaggedSentences:
    """A CoNLL-U file (its UPOS or XPOS column) or a column file (its tag column)."""
    from rnnkit.data._files import base_suffix, existing_file

    file = existing_file(path, "--data")
    if base_suffix(file) == ".conllu" and tagset == "ner":
        raise RunError(
            f"--data {path}: a CoNLL-U file has no entity tags; use --tagset upos or xpos, or "
            "give a column file (token and IOB2 tag per line)"
        )
    return load_tagged_file(file, "upos" if tagset == "ner" else tagset)


# -- the application --------------------------------------------------------------------------
@dataclass
class PreparedTag:
    model: SequenceTagger
    task: TaggingTask
    files: dict[str, Any]
    test: Examples
    encoder: TokenEncoder


def prepare(settings: TagSettings, saved: dict[str, Any] | None, device) -> PreparedTag:
    """Data, encoder and model for a run (saved: vocab.json when resuming)."""
    train, valid, test = load_splits(settings)
    if saved is None:
        encoder = TokenEncoder.build(train, settings.max_word_length)
        unseen = sorted(set(valid.tagset + test.tagset) - set(encoder.tags))
        if unseen:
            # A tag only in valid/test would be impossible to predict; let the model know it.
            encoder = TokenEncoder(
                encoder.words,
                encoder.chars,
                sorted({*encoder.tags, *unseen}),
                settings.max_word_length,
            )
    else:
        encoder = TokenEncoder.from_dict(saved)
    if len(encoder.tags) < 2:
        raise DataError(f"{settings.data}: a single tag {encoder.tags}; tagging needs at least 2")
    config = SequenceTaggerConfig(
        num_tags=len(encoder.tags),
        vocab_size=encoder.vocab_size,
        char_vocab_size=len(encoder.chars),
        embedding_dim=settings.embedding_dim,
        char_channels=settings.char_channels,
        cell=settings.cell,
        hidden_size=settings.hidden,
        num_layers=settings.layers,
        bidirectional=settings.bidirectional,
        dropout=settings.dropout,
        crf=settings.crf,
    )
    model = SequenceTagger(config).to(device)
    train_examples = Examples.encode(encoder, train)
    metric = "f1" if is_iob(encoder.tags) else "accuracy"
    task = TaggingTask(
        train_examples,
        Examples.encode(encoder, valid),
        encoder,
        settings.batch_size,
        settings.seed,
        device,
        metric,
    )
    return PreparedTag(
        model, task, {"vocab.json": encoder.to_dict()}, Examples.encode(encoder, test), encoder
    )


def model_config(prepared: PreparedTag) -> dict[str, Any]:
    return {"class": "SequenceTagger", "config": asdict(prepared.model.config)}


def finish(prepared: PreparedTag, run_dir: Path) -> dict[str, Any]:
    """Test metrics, the most-frequent-tag baseline, and the confusion matrix (<= 20 tags)."""
    encoder, test = prepared.encoder, prepared.test
    metrics, predicted = evaluate_examples(prepared.model, test, encoder, prepared.task.device)
    baseline = tagging_metrics(
        test.sentences.tags,
        most_frequent_tag_baseline(prepared.task.train.sentences, test.sentences),
    )
    matrix = confusion_matrix(
        np.concatenate(test.tags), np.concatenate(predicted), len(encoder.tags)
    )
    if len(encoder.tags) <= 20:
        plot_confusion_matrix(run_dir / "confusion.png", matrix, encoder.tags)
    return {
        "test": {**metrics, "sentences": len(test), "tokens": int(sum(map(len, test.tags)))},
        "baseline": {"name": "most frequent tag per word", **baseline},
        "confusion_matrix": matrix.tolist(),
        "tags": encoder.tags,
    }


def evaluate_run(
    model: SequenceTagger, state: dict, settings: TagSettings, data: str | None
) -> dict[str, Any]:
    """Metrics of a trained tagger on `data` (all of it) or on its run's test split."""
    encoder = TokenEncoder.from_dict(state)
    sentences = load_splits(settings)[2] if data is None else load_user_file(data, settings.tagset)
    examples = Examples.encode(encoder, sentences)
    metrics, _ = evaluate_examples(model, examples, encoder, torch.device("cpu"))
    return {**metrics, "sentences": len(sentences)}


def tag_texts(model: SequenceTagger, state: dict, texts: list[str]) -> list[list[tuple[str, str]]]:
    """For each text: its tokens (split on whitespace and punctuation) with their tags."""
    encoder = TokenEncoder.from_dict(state)
    results: list[list[tuple[str, str]]] = [[] for _ in texts]
    sentences = [(i, tokenize(text)) for i, text in enumerate(texts)]
    sentences = [(i, tokens) for i, tokens in sentences if tokens]
    if sentences:
        predicted = predict_ids(
            model, [encoder.encode(t) for _, t in sentences], torch.device("cpu")
        )
        for (index, tokens), ids in zip(sentences, predicted):
            results[index] = [(token, encoder.tags[i]) for token, i in zip(tokens, ids)]
    return results
