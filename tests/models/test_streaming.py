"""Streaming the application models: chunk by chunk equals the whole sequence at once."""

import pytest
import torch

from rnnkit import Stream
from rnnkit.models import (
    LanguageModel,
    LanguageModelConfig,
    SequenceClassifier,
    SequenceClassifierConfig,
)

CHUNKS = (1, 3, 1, 5, 2)  # sizes of the chunks a 12-step sequence is fed in


def split(x: torch.Tensor, sizes=CHUNKS) -> list[torch.Tensor]:
    return list(torch.split(x, list(sizes), dim=1))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_language_model_chunks_match_whole_sequence(cell):
    torch.manual_seed(0)
    config = LanguageModelConfig(vocab_size=11, embedding_dim=5, cell=cell, hidden_size=7)
    model = LanguageModel(config).double().eval()
    tokens = torch.randint(0, 11, (3, sum(CHUNKS)))
    whole, final = model(tokens)
    stream = Stream(model)
    pieces = [stream.step(chunk) for chunk in split(tokens)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-12, atol=1e-12)
    states = zip(stream.state, final) if cell == "lstm" else [(stream.state, final)]
    for got, expected in states:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert stream.steps == sum(CHUNKS)


def test_language_model_initial_state_is_the_zero_state_of_its_stack():
    model = LanguageModel(LanguageModelConfig(vocab_size=5, hidden_size=6, num_layers=2))
    h, c = model.initial_state(4)
    assert h.shape == c.shape == (2, 4, 6)
    assert not h.any() and not c.any()
    with pytest.raises(ValueError, match="batch_size"):
        model.initial_state(0)


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_classifier_streams_the_logits_of_every_prefix(pooling, cell):
    torch.manual_seed(1)
    config = SequenceClassifierConfig(
        num_classes=4, vocab_size=9, embedding_dim=5, cell=cell, hidden_size=6,
        num_layers=2, pooling=pooling,
    )  # fmt: skip
    model = SequenceClassifier(config).double().eval()
    tokens = torch.randint(1, 9, (2, sum(CHUNKS)))
    stream = Stream(model)
    streamed = torch.cat([stream.step(chunk) for chunk in split(tokens)], dim=1)
    assert streamed.shape == (2, sum(CHUNKS), 4)
    for k in range(1, tokens.size(1) + 1):
        torch.testing.assert_close(streamed[:, k - 1], model(tokens[:, :k]), rtol=1e-10, atol=1e-10)


def test_classifier_of_features_streams_in_float32():
    torch.manual_seed(2)
    config = SequenceClassifierConfig(num_classes=3, input_size=4, hidden_size=8, pooling="mean")
    model = SequenceClassifier(config).eval()
    features = torch.randn(5, sum(CHUNKS), 4)
    stream = Stream(model)
    streamed = torch.cat([stream.step(chunk) for chunk in split(features)], dim=1)
    torch.testing.assert_close(streamed[:, -1], model(features), rtol=1e-5, atol=1e-6)


def test_classifier_stream_state_saves_and_resumes(tmp_path):
    torch.manual_seed(3)
    config = SequenceClassifierConfig(num_classes=3, vocab_size=6, hidden_size=5, pooling="max")
    model = SequenceClassifier(config).eval()
    tokens = torch.randint(1, 6, (1, 9))
    first = Stream(model)
    first.step(tokens[:, :4])
    path = first.save(tmp_path / "classifier.safetensors")
    resumed = Stream(model)
    resumed.load(path)
    torch.testing.assert_close(resumed.step(tokens[:, 4:])[:, -1], model(tokens))


def test_bidirectional_classifier_refuses_to_stream():
    config = SequenceClassifierConfig(num_classes=2, vocab_size=5, bidirectional=True)
    model = SequenceClassifier(config)
    with pytest.raises(ValueError, match="bidirectional=True"):
        model.initial_state(1)
    with pytest.raises(ValueError, match="unidirectional"):
        Stream(model).step(torch.ones(1, 3, dtype=torch.int64))
