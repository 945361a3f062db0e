import numpy as np
import pytest
import torch

from rnnkit.data import pad_batch, split_indices


def test_pad_batch_pads_and_reports_lengths():
    padded, lengths = pad_batch([[5, 6, 7], [8], torch.tensor([9, 10])], pad=0)
    assert padded.dtype == torch.int64 and lengths.dtype == torch.int64
    assert padded.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert lengths.tolist() == [3, 1, 2]


def test_pad_batch_accepts_any_iterable_of_sequences():
    padded, lengths = pad_batch(row for row in ((1, 2), (3,)))
    assert padded.tolist() == [[1, 2], [3, 0]]
    assert lengths.tolist() == [2, 1]


def test_pad_batch_custom_pad_value():
    padded, _ = pad_batch([[1], [2, 3]], pad=-1)
    assert padded.tolist() == [[1, -1], [2, 3]]


@pytest.mark.parametrize(
    "sequences, error, message",
    [
        ([], ValueError, "at least one sequence"),
        ([[1], []], ValueError, r"sequences\[1\] is empty"),
        ([[1.5, 2.0]], TypeError, "integer ids"),
        ([[[1, 2]]], ValueError, "must be 1-D"),
        ("abc", TypeError, "list of id lists"),
    ],
)
def test_pad_batch_rejects_bad_input(sequences, error, message):
    with pytest.raises(error, match=message):
        pad_batch(sequences)


def test_split_is_deterministic_disjoint_and_complete():
    train, valid, test = split_indices(1000, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(valid), len(test)) == (800, 100, 100)
    assert train.dtype == np.int64
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(1000))
    again = split_indices(1000, (0.8, 0.1, 0.1), seed=3)
    for first, second in zip((train, valid, test), again):
        np.testing.assert_array_equal(first, second)
    other_train, _, _ = split_indices(1000, (0.8, 0.1, 0.1), seed=4)
    assert not np.array_equal(train, other_train)


def test_small_split_keeps_every_requested_part_non_empty():
    train, valid, test = split_indices(5, (0.8, 0.1, 0.1))
    assert (len(train), len(valid), len(test)) == (3, 1, 1)
    train, valid, test = split_indices(4, (0.5, 0.5, 0.0))
    assert (len(train), len(valid), len(test)) == (2, 2, 0)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="3 non-negative"):
        split_indices(10, (1.2, -0.2, 0.0))
    with pytest.raises(ValueError, match="n must be"):
        split_indices(-1)
