"""Quality figures and the simple baselines each application must beat."""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) true and predicted class ids -> (C, C) counts, rows = true class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true), np.asarray(predicted)), 1)
    return matrix


def accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    """Fraction of (N,) predictions equal to the (N,) true labels."""
    true, predicted = np.asarray(true), np.asarray(predicted)
    return float((true == predicted).mean()) if true.size else float("nan")


def macro_f1(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in `true` or `predicted`."""
    matrix = confusion_matrix(true, predicted, num_classes)
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(1)
    predicted_count = matrix.sum(0)
    present = (support + predicted_count) > 0
    denominator = support + predicted_count
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1[present].mean()) if present.any() else float("nan")


def majority_class_baseline(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int):
    """Accuracy and macro-F1 of always predicting the most frequent training class."""
    majority = int(np.bincount(np.asarray(train_labels), minlength=num_classes).argmax())
    guess = np.full_like(np.asarray(test_labels), majority)
    return {
        "accuracy": accuracy(test_labels, guess),
        "macro_f1": macro_f1(test_labels, guess, num_classes),
    }


def bits_per_token(mean_nll_nats: float) -> float:
    """Mean negative log-likelihood in nats -> bits per token."""
    return mean_nll_nats / math.log(2)


def unigram_bits_per_token(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int) -> float:
    """Bits per token on `test_ids` of add-one-smoothed unigram frequencies from `train_ids`."""
    counts = np.bincount(np.asarray(train_ids), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log2(counts / counts.sum())
    return float(-log_probs[np.asarray(test_ids)].mean())


def mae(true: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute error over all elements."""
    return float(np.mean(np.abs(np.asarray(true) - np.asarray(predicted))))


def rmse(true: np.ndarray, predicted: np.ndarray) -> float:
    """Root mean squared error over all elements."""
    return float(np.sqrt(np.mean((np.asarray(true) - np.asarray(predicted)) ** 2)))


def seasonal_naive_forecast(history: np.ndarray, horizon: int, period: int | None) -> np.ndarray:
    """(T, C) history -> (horizon, C): each step repeats the value one season earlier.

    With period None (or 1) this is the naive forecast: the last value, repeated.
    """
    history = np.asarray(history)
    period = period or 1
    if history.shape[0] < period:
        raise ValueError(
            f"seasonal_naive_forecast: history must hold at least period={period} steps, "
            f"got {history.shape[0]}"
        )
    last_season = history[-period:]
    return np.stack([last_season[h % period] for h in range(horizon)])
