import math

import numpy as np
import pytest

from rnnkit.train.metrics import (
    accuracy,
    bits_per_token,
    confusion_matrix,
    macro_f1,
    mae,
    majority_class_baseline,
    rmse,
    seasonal_naive_forecast,
    unigram_bits_per_token,
)


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_macro_f1_matches_a_hand_computation():
    true = np.array([0, 0, 1, 2])
    predicted = np.array([0, 1, 1, 1])
    # class 0: p=1, r=.5 -> 2/3; class 1: p=1/3, r=1 -> .5; class 2: 0
    assert math.isclose(macro_f1(true, predicted, 3), (2 / 3 + 0.5 + 0) / 3)
    assert accuracy(true, predicted) == 0.5


def test_majority_baseline_predicts_the_most_frequent_training_class():
    result = majority_class_baseline(np.array([1, 1, 0]), np.array([1, 0, 1, 1]), 2)
    assert result["accuracy"] == 0.75


def test_unigram_bits_match_uniform_when_counts_are_equal():
    train = np.array([0, 1, 2, 3] * 5)
    assert math.isclose(unigram_bits_per_token(train, np.array([0, 3]), 4), 2.0)
    assert math.isclose(bits_per_token(math.log(2)), 1.0)


def test_seasonal_naive_repeats_the_last_season():
    history = np.arange(10, dtype=float)[:, None]
    assert seasonal_naive_forecast(history, 5, 3)[:, 0].tolist() == [7, 8, 9, 7, 8]
    assert seasonal_naive_forecast(history, 2, None)[:, 0].tolist() == [9, 9]
    with pytest.raises(ValueError, match="period=20"):
        seasonal_naive_forecast(history, 2, 20)


def test_errors():
    assert mae(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == 1.5
    assert math.isclose(rmse(np.array([0.0, 0.0]), np.array([3.0, 4.0])), math.sqrt(12.5))
