import pytest
import torch

from rnnkit.models import (
    Forecaster,
    ForecasterConfig,
    LanguageModel,
    LanguageModelConfig,
    SequenceClassifier,
    SequenceClassifierConfig,
)


def classifier(**overrides) -> SequenceClassifier:
    torch.manual_seed(0)
    settings = {"num_classes": 3, "vocab_size": 11, "hidden_size": 6, "embedding_dim": 5}
    settings.update(overrides)
    return SequenceClassifier(SequenceClassifierConfig(**settings)).eval()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_maps_token_batches_to_logits(cell, pooling, bidirectional):
    model = classifier(cell=cell, pooling=pooling, bidirectional=bidirectional, num_layers=2)
    tokens = torch.randint(1, 11, (4, 7))
    logits = model(tokens, torch.tensor([7, 3, 5, 1]))
    assert logits.shape == (4, 3)
    assert model.head.in_features == (12 if bidirectional else 6)


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_classifier_ignores_padding(pooling):
    model = classifier(pooling=pooling, bidirectional=True)
    tokens = torch.randint(1, 11, (2, 4))
    lengths = torch.tensor([4, 2])
    padded = torch.cat([tokens, torch.randint(1, 11, (2, 3))], dim=1)
    padded[1, 2:] = torch.randint(1, 11, (5,))
    short = model(tokens[1:, :2], torch.tensor([2]))
    torch.testing.assert_close(model(padded, torch.tensor([4, 2]))[1:], short)
    torch.testing.assert_close(model(tokens, lengths)[1:], short)


def test_last_pooling_concatenates_both_final_states():
    model = classifier(bidirectional=True)
    tokens = torch.randint(1, 11, (3, 5))
    _, (h_n, _) = model.rnn(model.embedding(tokens))
    expected = model.head(torch.cat([h_n[-2], h_n[-1]], dim=-1))
    torch.testing.assert_close(model(tokens), expected)


def test_classifier_takes_feature_sequences():
    model = classifier(vocab_size=None, input_size=8)
    assert model.embedding is None
    assert model(torch.rand(5, 8, 8)).shape == (5, 3)


def test_classifier_config_rejects_bad_values():
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        SequenceClassifierConfig(num_classes=2)
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifierConfig(num_classes=2, vocab_size=5, pooling="sum")
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifierConfig(num_classes=1, vocab_size=5)
    with pytest.raises(ValueError, match="cell"):
        SequenceClassifier(SequenceClassifierConfig(num_classes=2, vocab_size=5, cell="tcn"))


def language_model(cell="lstm") -> LanguageModel:
    torch.manual_seed(0)
    config = LanguageModelConfig(vocab_size=9, embedding_dim=4, hidden_size=8, cell=cell)
    return LanguageModel(config).eval()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_language_model_carried_state_equals_one_long_pass(cell):
    model = language_model(cell)
    tokens = torch.randint(0, 9, (2, 10))
    whole, _ = model(tokens)
    first, state = model(tokens[:, :6])
    second, _ = model(tokens[:, 6:], state)
    assert whole.shape == (2, 10, 9)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)


def test_generate_continues_the_prompt():
    model = language_model()
    prompt = torch.tensor([1, 2, 3])
    out = model.generate(prompt, 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8,) and out.dtype == torch.int64
    assert out[:3].tolist() == [1, 2, 3]
    assert out.min() >= 0 and out.max() < 9
    again = model.generate(prompt, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert model.generate(torch.tensor([[1], [2]]), 4).shape == (2, 5)


def test_greedy_generation_equals_top_1_sampling_and_the_argmax_chain():
    model = language_model()
    prompt = torch.tensor([4])
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, top_k=1), greedy)
    tokens = prompt.unsqueeze(0)
    for _ in range(6):
        logits, _ = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens[0], greedy)


def test_top_k_restricts_samples_to_the_k_likeliest():
    model = language_model()
    prompt = torch.tensor([4])
    logits, _ = model(prompt.unsqueeze(0))
    allowed = set(logits[0, -1].topk(2).indices.tolist())
    generator = torch.Generator().manual_seed(1)
    firsts = {int(model.generate(prompt, 1, top_k=2, generator=generator)[1]) for _ in range(30)}
    assert firsts <= allowed


def test_suppressed_ids_are_never_generated():
    model = language_model()
    with torch.no_grad():
        model.head.bias[:2] = 100.0  # ids 0 and 1 would otherwise win every time
    out = model.generate(
        torch.tensor([4]), 30, generator=torch.Generator().manual_seed(0), suppress=(0, 1)
    )
    assert out[1:].min() >= 2
    assert model.generate(torch.tensor([4]), 5, temperature=0)[1:].max() <= 1


def test_generate_rejects_bad_arguments():
    model = language_model()
    with pytest.raises(ValueError, match="length"):
        model.generate(torch.tensor([1]), -1)
    with pytest.raises(TypeError, match="prompt"):
        model.generate(torch.tensor([1.0]), 2)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.tensor([1]), 2, top_k=0)


def forecaster(period: int = 1) -> Forecaster:
    torch.manual_seed(0)
    config = ForecasterConfig(num_channels=2, window=6, horizon=3, period=period, hidden_size=8)
    model = Forecaster(config).eval()
    model.set_scale(torch.tensor([10.0, -1.0]), torch.tensor([2.0, 0.5]))
    return model


def test_an_untrained_forecaster_gives_the_seasonal_naive_forecast():
    window = torch.randn(4, 6, 2) * 2 + 10
    torch.testing.assert_close(forecaster()(window), window[:, -1:].expand(4, 3, 2))
    seasonal = forecaster(period=2)(window)
    torch.testing.assert_close(seasonal, window[:, [4, 5, 4]])


def test_forecaster_learns_corrections_in_input_units():
    model = forecaster()
    torch.nn.init.normal_(model.head.weight)
    window = torch.randn(4, 6, 2) * 2 + 10
    out = model(window)
    assert out.shape == (4, 3, 2)
    loc = window.mean(1, keepdim=True)
    scale = window.std(1, keepdim=True, correction=0)
    z = (window - loc) / scale
    _, (h_n, _) = model.rnn(z)
    change = model.head(h_n[-1]).view(4, 3, 2)
    expected = (z[:, -1:] + change) * scale + loc
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="period"):
        ForecasterConfig(num_channels=1, window=4, period=5)


def test_forecast_beyond_the_horizon_feeds_forecasts_back():
    model = forecaster()
    torch.nn.init.normal_(model.head.weight)
    history = torch.randn(10, 2)
    long = model.forecast(history, 7)
    assert long.shape == (7, 2)
    first = model(history[-6:].unsqueeze(0))[0]
    torch.testing.assert_close(long[:3], first)
    second = model(torch.cat([history, first])[-6:].unsqueeze(0))[0]
    torch.testing.assert_close(long[3:6], second)
    with pytest.raises(ValueError, match="window=6"):
        model.forecast(history[:4], 2)
