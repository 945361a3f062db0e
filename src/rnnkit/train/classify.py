"""Sequence classification (many-to-one): texts by characters or words, or digit images by rows.

Data: the shipped surnames -> language set (or a user's CSV/TSV/JSONL with text and label
columns), or `--data digits`: scikit-learn's 8x8 digits read one 8-pixel row per step.
Split 80/10/10 (shuffled, seeded); validation accuracy drives early stopping; the test split
gets accuracy, macro-F1 and a confusion matrix, next to the majority-class baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.data import (
    CharVocab,
    DataError,
    WordVocab,
    load_digit_sequences,
    load_labelled_texts,
    pad_batch,
    split_indices,
)
from rnnkit.models import SequenceClassifier, SequenceClassifierConfig
from rnnkit.models.classifier import POOLINGS
from rnnkit.train.checkpoint import Carry
from rnnkit.train.metrics import accuracy, confusion_matrix, macro_f1, majority_class_baseline
from rnnkit.train.plots import plot_confusion_matrix
from rnnkit.train.rundir import RunError
from rnnkit.train.settings import Settings
from rnnkit.train.trainer import Batch, StepOutput

DIGITS = "digits"


@dataclass
class ClassifySettings(Settings):
    """Classification options: token level for texts, pooling, embedding size."""

    hidden: int = 128
    epochs: int = 15
    level: str = "char"
    pooling: str = "last"
    embedding_dim: int = 64
    dropout: float = 0.2
    learning_rate: float = 5e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.level not in ("char", "word"):
            raise RunError(f"--level must be 'char' or 'word', got {self.level!r}")
        if self.pooling not in POOLINGS:
            raise RunError(f"--pooling must be one of {POOLINGS}, got {self.pooling!r}")


@dataclass
class Examples:
    """Encoded examples: id lists (texts) or (N, T, F) features (digits), and label ids."""

    inputs: list[list[int]] | np.ndarray
    labels: np.ndarray

    def subset(self, indices: np.ndarray) -> Examples:
        if isinstance(self.inputs, np.ndarray):
            return Examples(self.inputs[indices], self.labels[indices])
        return Examples([self.inputs[i] for i in indices], self.labels[indices])

    def __len__(self) -> int:
        return len(self.labels)


def make_batch(examples: Examples) -> Batch:
    """Examples -> (inputs, (B,) lengths, (B,) labels) tensors."""
    labels = torch.as_tensor(examples.labels, dtype=torch.int64)
    if isinstance(examples.inputs, np.ndarray):
        inputs = torch.as_tensor(examples.inputs, dtype=torch.float32)
        lengths = torch.full((len(examples),), inputs.size(1), dtype=torch.int64)
        return inputs, lengths, labels
    inputs, lengths = pad_batch(examples.inputs)
    return inputs, lengths, labels


@dataclass
class ClassificationTask:
    """Shuffled full batches of the training split; validation accuracy decides."""

    train: Examples
    valid: Examples
    batch_size: int
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metric: str = "accuracy"
    higher_is_better: bool = True

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.batch_size)

    def batches(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        size = min(self.batch_size, len(self.train))
        for start in range(0, self.steps_per_epoch() * size, size):
            yield make_batch(self.train.subset(order[start : start + size]))

    def loss(self, model: nn.Module, batch: Batch, carry: Carry) -> StepOutput:
        inputs, lengths, labels = batch
        logits = model(inputs, lengths)
        return StepOutput(F.cross_entropy(logits, labels), None, int(lengths.sum()))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_examples(model, self.valid, self.device, num_classes=None)[0]


def predict_examples(model: nn.Module, examples: Examples, device, batch_size: int = 256) -> Tensor:
    """(N, C) class probabilities for the examples."""
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples.subset(np.arange(start, min(start + batch_size, len(examples))))
            inputs, lengths, _ = make_batch(chunk)
            parts.append(torch.softmax(model(inputs.to(device), lengths), dim=-1).cpu())
    return torch.cat(parts)


def evaluate_examples(
    model: nn.Module, examples: Examples, device, num_classes: int | None
) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, macro-F1 and mean cross-entropy on examples, and the predicted ids."""
    probabilities = predict_examples(model, examples, device)
    num_classes = num_classes or probabilities.size(1)
    predicted = probabilities.argmax(1).numpy()
    labels = torch.as_tensor(examples.labels)
    loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), labels).item()
    metrics = {
        "accuracy": accuracy(examples.labels, predicted),
        "macro_f1": macro_f1(examples.labels, predicted, num_classes),
        "loss": loss,
    }
    return metrics, predicted


# -- preprocessing: what vocab.json stores -----------------------------------------------------
def build_vocab(level: str, texts: list[str]) -> CharVocab | WordVocab:
    """A character or word vocabulary over the training texts."""
    return CharVocab.build(texts) if level == "char" else WordVocab.build(texts, min_count=1)


def vocab_from_state(state: dict[str, Any]) -> CharVocab | WordVocab | None:
    """The vocabulary saved in vocab.json (None for feature input)."""
    if state.get("level") is None:
        return None
    cls = CharVocab if state["level"] == "char" else WordVocab
    return cls.from_dict(state["vocab"])


def encode_texts(vocab: CharVocab | WordVocab, texts: list[str]) -> list[list[int]]:
    """Texts -> id lists; an empty encoding becomes one <unk> so every length is >= 1."""
    return [vocab.encode(text) or [1] for text in texts]


def load_examples(settings: ClassifySettings, state: dict[str, Any] | None):
    """(examples, preprocessing state) for the settings' data; reuse `state` when resuming."""
    if settings.data == DIGITS:
        features, labels = load_digit_sequences()
        classes = [str(i) for i in range(10)]
        new_state = {"level": None, "classes": classes, "input_size": int(features.shape[2])}
        return Examples(features.astype(np.float32), labels.astype(np.int64)), new_state, None
    data = load_labelled_texts(settings.data)
    if state is None:
        classes = sorted(set(data.labels))
        train_index = split_indices(len(data.texts), seed=settings.seed)[0]
        vocab = build_vocab(settings.level, [data.texts[i] for i in train_index])
        state = {"level": settings.level, "classes": classes, "vocab": vocab.to_dict()}
    vocab = vocab_from_state(state)
    label_ids = labels_to_ids(data.labels, state["classes"], settings.data)
    return Examples(encode_texts(vocab, data.texts), label_ids), state, vocab


def labels_to_ids(labels: list[str], classes: list[str], source) -> np.ndarray:
    """Label strings -> ids in `classes`; DataError naming labels the model does not know."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(
            f"{source or 'data'}: labels {unknown[:5]} are not among the trained classes {classes}"
        )
    return np.array([index[label] for label in labels], dtype=np.int64)


# -- the application --------------------------------------------------------------------------
@dataclass
class PreparedClassify:
    model: SequenceClassifier
    task: ClassificationTask
    files: dict[str, Any]
    test: Examples
    state: dict[str, Any]


def prepare(settings: ClassifySettings, saved: dict[str, Any] | None, device) -> PreparedClassify:
    """Data, splits, vocabulary and model for a run (saved: vocab.json when resuming)."""
    examples, state, vocab = load_examples(settings, saved)
    train_index, valid_index, test_index = split_indices(len(examples), seed=settings.seed)
    config = SequenceClassifierConfig(
        num_classes=len(state["classes"]),
        vocab_size=len(vocab) if vocab is not None else None,
        input_size=state.get("input_size"),
        embedding_dim=settings.embedding_dim,
        cell=settings.cell,
        hidden_size=settings.hidden,
        num_layers=settings.layers,
        bidirectional=settings.bidirectional,
        dropout=settings.dropout,
        pooling=settings.pooling,
    )
    model = SequenceClassifier(config).to(device)
    task = ClassificationTask(
        examples.subset(train_index),
        examples.subset(valid_index),
        settings.batch_size,
        settings.seed,
        device,
    )
    return PreparedClassify(model, task, {"vocab.json": state}, examples.subset(test_index), state)


def model_config(prepared: PreparedClassify) -> dict[str, Any]:
    return {"class": "SequenceClassifier", "config": asdict(prepared.model.config)}


def finish(prepared: PreparedClassify, run_dir: Path) -> dict[str, Any]:
    """Test metrics, the majority baseline and the confusion matrix PNG."""
    classes = prepared.state["classes"]
    metrics, predicted = evaluate_examples(
        prepared.model, prepared.test, prepared.task.device, len(classes)
    )
    matrix = confusion_matrix(prepared.test.labels, predicted, len(classes))
    plot_confusion_matrix(run_dir / "confusion.png", matrix, classes)
    baseline = majority_class_baseline(
        prepared.task.train.labels, prepared.test.labels, len(classes)
    )
    return {
        "test": metrics,
        "baseline": {"name": "majority class", **baseline},
        "confusion_matrix": matrix.tolist(),
        "classes": classes,
    }


def evaluate_run(
    model: SequenceClassifier, state: dict, settings: ClassifySettings, data: str | None
) -> dict[str, Any]:
    """Metrics of a trained classifier on `data` (all of it) or on its run's test split."""
    if data is None:
        examples, _, _ = load_examples(settings, state)
        test_index = split_indices(len(examples), seed=settings.seed)[2]
        examples = examples.subset(test_index)
    elif state.get("level") is None:
        if data != DIGITS:
            raise RunError("this run classifies digits: --data can only be 'digits' (all of them)")
        features, labels = load_digit_sequences()
        examples = Examples(features.astype(np.float32), labels.astype(np.int64))
    else:
        texts = load_labelled_texts(data)
        vocab = vocab_from_state(state)
        labels = labels_to_ids(texts.labels, state["classes"], data)
        examples = Examples(encode_texts(vocab, texts.texts), labels)
    metrics, _ = evaluate_examples(model, examples, torch.device("cpu"), len(state["classes"]))
    metrics["examples"] = len(examples)
    return metrics


def predict_texts(model: SequenceClassifier, state: dict, texts: list[str]) -> list[dict[str, Any]]:
    """For each text: the predicted label and its probability."""
    vocab = vocab_from_state(state)
    if vocab is None:
        raise RunError("this run classifies digit images, not texts; predict needs a text run")
    examples = Examples(encode_texts(vocab, texts), np.zeros(len(texts), dtype=np.int64))
    probabilities = predict_examples(model, examples, torch.device("cpu"))
    results = []
    for text, row in zip(texts, probabilities):
        best = int(row.argmax())
        results.append(
            {"text": text, "label": state["classes"][best], "probability": float(row[best])}
        )
    return results
