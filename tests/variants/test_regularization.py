"""Recurrent regularisers: identity in eval, the right keep-probability and mask sharing in
training, zoneout's eval expectation, and the equations they stand for."""

from __future__ import annotations

import copy

import pytest
import torch

import rnnkit
from rnnkit.cells import lstm_step
from rnnkit.cells.layer_norm import ln_gru_gates
from rnnkit.spec import LayerSpec
from rnnkit.variants import LayerNormGRU, LayerNormLSTM
from rnnkit.variants.regularization import (
    check_regularizers,
    drop_input,
    drop_weights,
    dropout_mask,
    regularized_step,
    zoneout_mask,
)

DOUBLE = torch.float64
ALL_LAYERS = [rnnkit.RNN, rnnkit.LSTM, rnnkit.GRU, LayerNormLSTM, LayerNormGRU]


def twin_layers(cls, **options):
    """(plain layer, the same weights with regularisers), float64."""
    torch.manual_seed(0)
    plain = cls(3, 6, num_layers=2, bidirectional=True, dtype=DOUBLE)
    regularised = cls(3, 6, num_layers=2, bidirectional=True, dtype=DOUBLE, **options)
    regularised.load_state_dict(plain.state_dict())
    return plain, regularised


@pytest.mark.parametrize("cls", ALL_LAYERS)
def test_dropouts_are_the_identity_in_eval_mode(cls):
    plain, regularised = twin_layers(cls, input_dropout=0.3, recurrent_dropout=0.4, weight_drop=0.5)
    regularised.eval()
    x = torch.randn(5, 2, 3, dtype=DOUBLE)
    expected, expected_state = plain(x, lengths=[5, 3])
    output, state = regularised(x, lengths=[5, 3])
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    torch.testing.assert_close(state, expected_state, atol=0, rtol=0)
    assert rnnkit.explain_backend(regularised, x) == "auto: fused cpu kernel for cpu tensors"


@pytest.mark.parametrize("cls", ALL_LAYERS)
def test_training_mode_regularisers_change_the_output_and_train(cls):
    _, regularised = twin_layers(
        cls, input_dropout=0.3, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.3
    )
    x = torch.randn(5, 2, 3, dtype=DOUBLE, requires_grad=True)
    torch.manual_seed(1)
    first, _ = regularised(x)
    torch.manual_seed(2)
    second, _ = regularised(x)
    assert not torch.allclose(first, second)
    first.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in regularised.parameters())
    assert x.grad.abs().sum() > 0


def test_variational_input_mask_is_shared_over_time_with_the_keep_probability():
    torch.manual_seed(0)
    p = 0.3
    x = torch.ones(6, 200, 100)
    dropped = drop_input(x, p, training=True)
    assert torch.equal(dropped, dropped[0].expand_as(dropped))
    kept = dropped[0] != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01  # 20000 draws: std 0.003
    assert torch.allclose(dropped[0][kept], torch.tensor(1 / (1 - p)))
    assert drop_input(x, p, training=False) is x


def test_weight_drop_masks_only_the_recurrent_weight():
    torch.manual_seed(0)
    p = 0.4
    weights = (torch.ones(400, 50), torch.ones(400, 100), torch.ones(400), torch.ones(400))
    w_ih, w_hh, b_ih, b_hh = drop_weights(weights, p, training=True)
    assert w_ih is weights[0] and b_ih is weights[2] and b_hh is weights[3]
    assert abs((w_hh == 0).double().mean().item() - p) < 0.01  # 40000 draws: std 0.0025
    assert torch.allclose(w_hh[w_hh != 0], torch.tensor(1 / (1 - p)))
    assert drop_weights(weights, p, training=False) == weights


def test_weight_drop_and_input_dropout_run_in_the_fused_kernel_and_match_the_reference():
    torch.manual_seed(0)
    fused = rnnkit.LSTM(3, 6, num_layers=2, dtype=DOUBLE, input_dropout=0.3, weight_drop=0.4)
    reference = copy.deepcopy(fused)
    reference.backend = "reference"
    x = torch.randn(5, 2, 3, dtype=DOUBLE)
    assert rnnkit.explain_backend(fused, x) == "auto: fused cpu kernel for cpu tensors"
    torch.manual_seed(7)
    output, _ = fused(x)
    torch.manual_seed(7)
    expected, _ = reference(x)
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=0)


def recording_step(received):
    """A fake cell step: records the state it is given and returns an all-zero next state."""

    def step(x, state):
        received.append(state[0].clone())
        return tuple(torch.zeros_like(part) for part in state)

    return step


def test_recurrent_mask_is_one_per_sequence_and_direction_with_the_keep_probability():
    torch.manual_seed(0)
    p = 0.25
    spec = LayerSpec("LSTM", 100, recurrent_dropout=p, training=True)
    state = (torch.ones(200, 100), torch.ones(200, 100))
    received = []
    step = regularized_step(recording_step(received), spec, state, steps=4)
    for _ in range(4):
        step(torch.zeros(200, 3), state)
    assert all(torch.equal(mask, received[0]) for mask in received)
    assert abs((received[0] == 0).double().mean().item() - p) < 0.01
    assert torch.allclose(received[0][received[0] != 0], torch.tensor(1 / (1 - p)))
    other = []
    regularized_step(recording_step(other), spec, state, steps=1)(torch.zeros(200, 3), state)
    assert not torch.equal(other[0], received[0])  # each direction's pass draws its own mask


def test_zoneout_in_training_keeps_each_unit_with_probability_p_afresh_each_step():
    torch.manual_seed(0)
    spec = LayerSpec("LSTM", 100, zoneout=(0.15, 0.6), training=True)
    state = (torch.ones(200, 100), torch.ones(200, 100))
    step = regularized_step(recording_step([]), spec, state, steps=2)
    first_h, first_c = step(torch.zeros(200, 3), state)
    second_h, _ = step(torch.zeros(200, 3), state)
    # The new state is zero and the old one, so each unit is 1 exactly where it was kept.
    for kept, p in ((first_h, 0.15), (first_c, 0.6)):
        # Five standard deviations of the mean of 20000 draws (0.018 at p = 0.6).
        assert abs(kept.mean().item() - p) < 5 * (p * (1 - p) / kept.numel()) ** 0.5
    assert not torch.equal(first_h, second_h)


def test_zoneout_in_eval_is_its_expectation():
    spec = LayerSpec("GRU", 4, zoneout=(0.3, 0.0), training=False)
    state = (torch.full((2, 4), 2.0),)
    (h,) = regularized_step(recording_step([]), spec, state, steps=1)(torch.zeros(2, 3), state)
    torch.testing.assert_close(h, torch.full((2, 4), 0.3 * 2.0))


@pytest.mark.parametrize("cls", [rnnkit.LSTM, LayerNormLSTM])
def test_zoneout_eval_layer_matches_the_expectation_equations(cls):
    torch.manual_seed(0)
    layer = cls(3, 4, dtype=DOUBLE, zoneout=(0.2, 0.5)).eval()
    x = torch.randn(6, 2, 3, dtype=DOUBLE)
    output, (h_n, c_n) = layer(x)
    assert rnnkit.explain_backend(layer, x) == "auto: fused cpu kernel for cpu tensors"
    step = rnnkit.scan.step_function(layer.spec)
    h = c = torch.zeros(2, 4, dtype=DOUBLE)
    for t in range(6):
        h_new, c_new = step(x[t], (h, c), *layer.cell_weights(0, 0))
        h, c = 0.2 * h + 0.8 * h_new, 0.5 * c + 0.5 * c_new
        torch.testing.assert_close(output[t], h, atol=1e-12, rtol=0)
    torch.testing.assert_close((h_n[0], c_n[0]), (h, c), atol=1e-12, rtol=0)


def test_lstm_recurrent_dropout_matches_the_equations_with_one_mask():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 5, dtype=DOUBLE, recurrent_dropout=0.4)
    x = torch.randn(6, 2, 3, dtype=DOUBLE)
    assert rnnkit.explain_backend(layer, x) == "auto: fused cpu kernel for cpu tensors"
    torch.manual_seed(3)
    output, _ = layer(x)
    torch.manual_seed(3)
    mask = torch.empty(2, 5, dtype=DOUBLE).bernoulli_(0.6) / 0.6
    h = c = torch.zeros(2, 5, dtype=DOUBLE)
    for t in range(6):
        h, c = lstm_step(x[t], (h * mask, c), *layer.cell_weights(0, 0)[:4])
        torch.testing.assert_close(output[t], h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_gru_recurrent_dropout_drops_the_matmul_input_but_carries_the_whole_state(layer_norm):
    torch.manual_seed(0)
    cls = LayerNormGRU if layer_norm else rnnkit.GRU
    layer = cls(3, 5, dtype=DOUBLE, recurrent_dropout=0.4)
    weights = layer.cell_weights(0, 0)
    x = torch.randn(6, 2, 3, dtype=DOUBLE)
    torch.manual_seed(3)
    output, _ = layer(x)
    torch.manual_seed(3)
    mask = torch.empty(2, 5, dtype=DOUBLE).bernoulli_(0.6) / 0.6
    h = torch.zeros(2, 5, dtype=DOUBLE)
    for t in range(6):
        if layer_norm:
            _, z, n = ln_gru_gates(x[t], h * mask, *weights)
        else:
            w_ih, w_hh, b_ih, b_hh = weights
            hidden_x, hidden_h = x[t] @ w_ih.T + b_ih, (h * mask) @ w_hh.T + b_hh
            r = torch.sigmoid(hidden_x[:, :5] + hidden_h[:, :5])
            z = torch.sigmoid(hidden_x[:, 5:10] + hidden_h[:, 5:10])
            n = torch.tanh(hidden_x[:, 10:] + r * hidden_h[:, 10:])
        h = (1 - z) * n + z * h
        torch.testing.assert_close(output[t], h, atol=1e-12, rtol=0)


def test_explicit_cpu_backend_runs_every_in_loop_regulariser():
    x = torch.randn(3, 2, 3)
    assert rnnkit.GRU(3, 4, backend="cpu", recurrent_dropout=0.2)(x)[0].shape == (3, 2, 4)
    # The layer-normalised cells have theirs (rnnkit.kernels.cpu.layer_norm), in both modes.
    layer = LayerNormGRU(3, 4, backend="cpu", recurrent_dropout=0.2, zoneout=0.1)
    assert layer(x)[0].shape == (3, 2, 4)
    layer.eval()
    assert layer(x)[0].shape == (3, 2, 4)
    projected = rnnkit.LSTM(3, 4, proj_size=2, zoneout=0.1, backend="cpu")
    assert rnnkit.explain_backend(projected, x) == "backend='cpu' was requested"
    assert projected(x)[0].shape == (3, 2, 2)


def test_options_are_validated_and_shown():
    with pytest.raises(ValueError, match=r"LSTM: recurrent_dropout must be a number in \[0, 1\)"):
        rnnkit.LSTM(3, 4, recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="GRU: zoneout must be one number"):
        rnnkit.GRU(3, 4, zoneout=(0.1, 0.2))
    with pytest.raises(ValueError, match="weight_drop"):
        rnnkit.RNN(3, 4, weight_drop="0.5")
    with pytest.raises(TypeError, match="zonout"):
        rnnkit.LSTM(3, 4, zonout=0.1)
    assert check_regularizers("LSTM", "LSTM", zoneout=0.1).zoneout == (0.1, 0.1)
    assert check_regularizers("GRU", "GRU", zoneout=0.1).zoneout == (0.1, 0.0)
    text = repr(rnnkit.LSTM(3, 4, zoneout=(0.1, 0.3), weight_drop=0.5))
    assert "zoneout=(0.1, 0.3)" in text and "weight_drop=0.5" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_zoneout_mask_follows_torch_manual_seed_with_the_keep_probability(dtype):
    like = torch.zeros(50, 40, dtype=dtype)
    torch.manual_seed(4)
    first = zoneout_mask(like, 30, 0.2)
    torch.manual_seed(4)
    second = zoneout_mask(like, 30, 0.2)
    assert first.shape == (30, 50, 40) and first.dtype == dtype
    assert torch.equal(first, second)
    assert not torch.equal(first, zoneout_mask(like, 30, 0.2))  # the generator moved on
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert abs(first.double().mean().item() - 0.2) < 0.01  # 60000 draws: std 0.0016
    assert not torch.equal(first[0], first[1])  # afresh at each step
    # Neighbouring entries are independent: both kept with probability p^2.
    pairs = (first.view(-1)[1:] * first.view(-1)[:-1]).double().mean().item()
    assert abs(pairs - 0.04) < 0.005


@pytest.mark.parametrize("shape, compiled", [((3, 5), False), ((64, 48), True)])
def test_dropout_mask_keeps_with_probability_1_minus_p_scaled_and_follows_manual_seed(
    shape, compiled, monkeypatch
):
    from rnnkit.kernels.cpu import random_masks

    calls = []
    draw = random_masks.bernoulli_mask
    monkeypatch.setattr(
        random_masks, "bernoulli_mask", lambda *args: calls.append(args) or draw(*args)
    )
    like = torch.zeros(shape, dtype=torch.float64)
    torch.manual_seed(3)
    first = dropout_mask(like, 0.25)
    torch.manual_seed(3)
    assert torch.equal(first, dropout_mask(like, 0.25))
    assert len(calls) == (2 if compiled else 0)  # the compiled draws from 1024 entries on
    assert first.shape == shape and first.dtype == torch.float64
    assert set(first.unique().tolist()) == {0.0, 1 / 0.75}
    if compiled:
        assert abs((first > 0).double().mean().item() - 0.75) < 0.03  # 3072 draws: std 0.008
