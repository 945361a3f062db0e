import torch

from rnnkit.experiments import rnn_vs_transformer
from rnnkit.experiments.networks import CausalTransformer, RecurrentReadout, parameter_count


def test_cached_steps_match_the_causal_forward():
    torch.manual_seed(0)
    model = CausalTransformer(3, 16, 4, 32, 2, 1).eval()
    inputs = torch.randn(2, 7, 3)
    with torch.no_grad():
        whole = model.encode(inputs)
        cache = model.empty_cache(2)
        for t in range(7):
            encoded, cache = model.step(inputs[:, t], t, cache)
            torch.testing.assert_close(encoded, whole[:, t], atol=1e-5, rtol=1e-5)
    assert cache[0][0].shape == (2, 4, 7, 4)


def test_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = CausalTransformer(3, 16, 4, 32, 1, 1).eval()
    inputs = torch.randn(1, 6, 3)
    changed = inputs.clone()
    changed[:, 4:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(model.encode(inputs)[:, :4], model.encode(changed)[:, :4])


def test_readout_shapes():
    model = RecurrentReadout("GRU", 3, 8, 5, num_layers=2, bidirectional=True, per_step=True)
    assert model(torch.randn(4, 6, 3)).shape == (4, 6, 5)
    model = RecurrentReadout("RNN", 3, 8, 1)
    assert model(torch.randn(4, 6, 3)).shape == (4, 1)


def test_compared_models_have_about_the_same_size():
    config = rnn_vs_transformer.CONFIGS["full"]
    rnn = RecurrentReadout(config.rnn_cell, 2, config.rnn_hidden, 1)
    transformer = CausalTransformer(
        2, config.width, config.heads, config.feedforward, config.layers, 1
    )
    ratio = parameter_count(transformer) / parameter_count(rnn)
    assert 0.9 < ratio < 1.1


def test_bidirectional_classifier_reads_each_direction_final_state():
    torch.manual_seed(0)
    model = RecurrentReadout("LSTM", 3, 4, 2, bidirectional=True)
    inputs = torch.randn(2, 5, 3)
    with torch.no_grad():
        outputs, _ = model.recurrent(inputs)
        expected = model.readout(torch.cat([outputs[:, -1, :4], outputs[:, 0, 4:]], -1))
        torch.testing.assert_close(model(inputs), expected)
