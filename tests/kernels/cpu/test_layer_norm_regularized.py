"""The fused layer-normalised LSTM/GRU kernels with recurrent dropout and zoneout.

The kernels draw their masks in the reference loop's order (draw_masks, once per direction), so
the same seed gives the same masks: outputs, final states and every gradient are compared with
the reference loop in training mode (random masks) and in eval mode (zoneout's expectation),
with lengths, initial states, two layers and both directions; gradcheck runs the autograd
Functions with fixed masks.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.kernels.cpu import layer_norm as kernel
from rnnkit.variants import LayerNormGRU, LayerNormLSTM

CELLS = {"ln_lstm": LayerNormLSTM, "ln_gru": LayerNormGRU}
# (recurrent_dropout, zoneout): each alone and both; the LSTM's zoneout pair differs for h and c.
RATES = {"dropout": (0.3, 0.0), "zoneout": (0.0, 0.25), "both": (0.35, (0.2, 0.4))}


def make_pair(cell, rates, dtype, hidden=5, **options):
    """(fused, reference) layers with the same parameters, gains and shifts away from 1 and 0."""
    recurrent_dropout, zoneout = rates
    if cell != "ln_lstm" and isinstance(zoneout, tuple):
        zoneout = zoneout[0]
    options = options | {"dtype": dtype, "recurrent_dropout": recurrent_dropout}
    torch.manual_seed(0)
    fused = CELLS[cell](3, hidden, backend="cpu", zoneout=zoneout, **options)
    with torch.no_grad():
        for parameter in fused.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    reference = CELLS[cell](3, hidden, backend="reference", zoneout=zoneout, **options)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def initial_state(cell, layers, batch, hidden, dtype):
    make = lambda: torch.randn(layers, batch, hidden, dtype=dtype, requires_grad=True)  # noqa: E731
    return (make(), make()) if cell == "ln_lstm" else make()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("rates", RATES.values(), ids=RATES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_reference_loop_with_the_same_masks_float64(
    cell, rates, training, outputs_and_gradients
):
    fused, reference = make_pair(cell, rates, torch.float64, num_layers=2, bidirectional=True)
    fused.train(training)
    reference.train(training)
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state(cell, 4, 4, 5, torch.float64)
    lengths = torch.tensor([6, 2, 5, 1])
    got = outputs_and_gradients(fused, x, hx, lengths, seed=11)
    expected = outputs_and_gradients(reference, x, hx, lengths, seed=11)
    # output, final state parts, dL/dx, dL/dhx parts, every parameter's gradient
    parts = 2 if cell == "ln_lstm" else 1
    assert len(got) == len(expected) == 2 + 2 * parts + len(list(fused.parameters()))
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())


@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_reference_loop_float32_batch_first_without_lengths(
    cell, outputs_and_gradients
):
    # 32 units: normalising a few units in float32 can divide by a tiny standard deviation.
    fused, reference = make_pair(cell, RATES["both"], torch.float32, hidden=32, batch_first=True)
    x = torch.randn(3, 40, 3, requires_grad=True)
    hx = initial_state(cell, 1, 3, 32, torch.float32)
    got = outputs_and_gradients(fused, x, hx, None, seed=5)
    expected = outputs_and_gradients(reference, x, hx, None, seed=5)
    for index, (a, b) in enumerate(zip(got, expected)):
        # Relative to each tensor's largest magnitude (as test_layer_norm_kernel's float32 check):
        # the layer norms' backward sums float32 rounding over a row, on the row's scale.
        scale = max(1.0, b.abs().max().item())
        assert torch.allclose(a, b, atol=1e-5 * scale, rtol=0), (index, (a - b).abs().max())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell", CELLS)
def test_the_path_without_gradients_matches_the_reference_loop(cell, training):
    # Under no_grad the kernels run without saving for a backward (a path of its own).
    fused, reference = make_pair(cell, RATES["both"], torch.float64, bidirectional=True)
    fused.train(training)
    reference.train(training)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 1])
    results = []
    for layer in (fused, reference):
        torch.manual_seed(4)
        with torch.no_grad():
            output, state = layer(x, lengths=lengths)
        results.append([output, *(state if isinstance(state, tuple) else (state,))])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (a - b).abs().max()


@pytest.mark.parametrize("cell", CELLS)
def test_batch_split_over_threads_matches_the_reference_loop(
    cell, monkeypatch, outputs_and_gradients
):
    # Thresholds lowered so that two torch threads run this small batch as two parts, each on
    # its rows of the masks.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(kernel, "_MIN_PART_STEP_WORK", 1)
        monkeypatch.setattr(kernel, "_MIN_PART", 1)
        split = 1 if kernel.blas.LIBRARY.startswith("OpenBLAS") else 2
        assert len(kernel._batch_parts(10, torch.empty(20, 5), 8)) == split
        fused, reference = make_pair(cell, RATES["both"], torch.float64, bidirectional=True)
        x = torch.randn(8, 10, 3, dtype=torch.float64, requires_grad=True)
        hx = initial_state(cell, 2, 10, 5, torch.float64)
        lengths = torch.tensor([8, 1, 4, 8, 3, 5, 2, 7, 5, 4])
        got = outputs_and_gradients(fused, x, hx, lengths, seed=2)
        expected = outputs_and_gradients(reference, x, hx, lengths, seed=2)
        for index, (a, b) in enumerate(zip(got, expected)):
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_with_fixed_masks(cell, training):
    """The autograd Functions themselves, with masks given: (T, B, H) 0/1 zoneout masks and a
    dropout mask in training, (1, 1, H) zoneout probabilities and no dropout mask in eval."""
    torch.manual_seed(1)
    lstm = cell == "ln_lstm"
    steps, batch, hidden, double = 4, 3, 3, torch.float64
    gates = 4 if lstm else 3
    layer = CELLS[cell](2, hidden, dtype=double)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    weights = tuple(layer.cell_weights(0, 0))
    assert weights[1].shape == (gates * hidden, hidden)
    x = torch.randn(steps, batch, 2, dtype=double, requires_grad=True)
    h0 = torch.randn(batch, hidden, dtype=double, requires_grad=True)
    c0 = torch.randn(batch, hidden, dtype=double, requires_grad=True)
    lengths = torch.tensor([4, 1, 3])
    if training:
        mask = torch.empty(batch, hidden, dtype=double).bernoulli_(0.6) / 0.6
        keeps = [torch.empty(steps, batch, hidden, dtype=double).bernoulli_(0.3) for _ in "hc"]
    else:
        mask = None
        keeps = [torch.full((1, 1, hidden), p, dtype=double) for p in (0.2, 0.4)]
    for reverse in (False, True):

        def function(x, h0, c0, *weights, reverse=reverse):
            if lstm:
                return kernel.LayerNormLSTMDirection.apply(
                    x, h0, c0, *weights, lengths, reverse, mask, *keeps
                )
            return kernel.LayerNormGRUDirection.apply(
                x, h0, None, *weights, lengths, reverse, mask, keeps[0]
            )

        assert torch.autograd.gradcheck(function, (x, h0, c0, *weights))


@pytest.mark.parametrize("cell", CELLS)
def test_auto_runs_the_fused_kernel_and_the_masks_act(cell, masks_act):
    layer = CELLS[cell](3, 5, recurrent_dropout=0.5, zoneout=0.3)
    x = torch.randn(7, 2, 3)
    evaluated = masks_act(layer, x)
    plain = CELLS[cell](3, 5)
    plain.load_state_dict(layer.state_dict())
    assert not torch.allclose(evaluated, plain.eval()(x)[0])  # zoneout acts in eval too


def test_the_cpu_backend_takes_layer_norm_cells_with_regularisers():
    x = torch.randn(3, 2, 3)
    for layer in (
        LayerNormLSTM(3, 4, recurrent_dropout=0.2, zoneout=(0.1, 0.2)),
        LayerNormGRU(3, 4, recurrent_dropout=0.2, zoneout=0.1),
    ):
        assert kernel.regularized.active(layer.spec)
        assert rnnkit.kernels.cpu.backend.unsupported_reason(layer.spec, x, None) is None


def test_an_empty_batch_runs_with_regularisers():
    layer = LayerNormLSTM(3, 4, recurrent_dropout=0.2, zoneout=0.1, backend="cpu")
    output, (h_n, c_n) = layer(torch.randn(5, 0, 3))
    assert output.shape == (5, 0, 4) and h_n.shape == c_n.shape == (1, 0, 4)
