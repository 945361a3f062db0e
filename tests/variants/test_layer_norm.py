"""Layer-normalised LSTM/GRU: cells against the paper's equations, layers against their cells."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.cells.layer_norm import (
    LayerNormGRUCell,
    LayerNormLSTMCell,
    ln_gru_step,
    ln_lstm_step,
)
from rnnkit.variants import LayerNormGRU, LayerNormLSTM

EPS = 1e-5
DOUBLE = torch.float64


def paper_ln(v, gain, shift):
    return F.layer_norm(v, v.shape[-1:], gain, shift, EPS)


def paper_lstm(x, h, c, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c):
    """Ba et al. 2016: (i, f, g, o) = LN(W_x x) + LN(W_h h); c' = ...; h' = o tanh(LN(c'))."""
    a = paper_ln(x @ w_ih.T, g_ih, b_ih) + paper_ln(h @ w_hh.T, g_hh, b_hh)
    hidden = h.size(-1)
    i, f, g, o = (a[:, k * hidden : (k + 1) * hidden] for k in range(4))
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(paper_ln(c_next, g_c, b_c)), c_next


def paper_gru(x, h, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh):
    """r, z from LN(W_x x) + LN(W_h h); n = tanh(a_x,n + r a_h,n); h' = (1 - z) n + z h."""
    a_x, a_h = paper_ln(x @ w_ih.T, g_ih, b_ih), paper_ln(h @ w_hh.T, g_hh, b_hh)
    hidden = h.size(-1)
    part = lambda a, k: a[:, k * hidden : (k + 1) * hidden]  # noqa: E731
    r = torch.sigmoid(part(a_x, 0) + part(a_h, 0))
    z = torch.sigmoid(part(a_x, 1) + part(a_h, 1))
    n = torch.tanh(part(a_x, 2) + r * part(a_h, 2))
    return (1 - z) * n + z * h


def random_weights(gates: int, inputs: int, hidden: int, cell_norm: bool, bias: bool = True):
    torch.manual_seed(3)
    rows = gates * hidden
    weights = [torch.randn(rows, inputs, dtype=DOUBLE), torch.randn(rows, hidden, dtype=DOUBLE)]
    weights += [torch.randn(rows, dtype=DOUBLE) if bias else None for _ in range(2)]
    weights += [1 + 0.3 * torch.randn(rows, dtype=DOUBLE) for _ in range(2)]
    if cell_norm:
        weights += [1 + 0.3 * torch.randn(hidden, dtype=DOUBLE)]
        weights += [torch.randn(hidden, dtype=DOUBLE) if bias else None]
    return [None if w is None else w.requires_grad_(True) for w in weights]


def grads_of(outputs, inputs):
    loss = sum((out * torch.linspace(-1, 1, out.numel(), dtype=DOUBLE).view_as(out)).sum()
               for out in outputs)  # fmt: skip
    return torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_step_matches_the_paper_equations(bias):
    weights = random_weights(4, 3, 5, cell_norm=True, bias=bias)
    x = torch.randn(4, 3, dtype=DOUBLE, requires_grad=True)
    h, c = (torch.randn(4, 5, dtype=DOUBLE, requires_grad=True) for _ in range(2))
    mine = ln_lstm_step(x, (h, c), *weights)
    theirs = paper_lstm(x, h, c, *weights)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    inputs = [x, h, c, *weights]
    for a, b in zip(grads_of(mine, inputs), grads_of(theirs, inputs)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_gru_step_matches_the_paper_equations(bias):
    weights = random_weights(3, 3, 5, cell_norm=False, bias=bias)
    x = torch.randn(4, 3, dtype=DOUBLE, requires_grad=True)
    h = torch.randn(4, 5, dtype=DOUBLE, requires_grad=True)
    (mine,) = ln_gru_step(x, (h,), *weights)
    theirs = paper_gru(x, h, *weights)
    torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=0)
    for a, b in zip(grads_of([mine], [x, h, *weights]), grads_of([theirs], [x, h, *weights])):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_recurrent_normalisation_makes_the_step_invariant_to_weight_scale():
    weights = random_weights(4, 3, 5, cell_norm=True)
    x, h, c = torch.randn(2, 3, dtype=DOUBLE), torch.randn(2, 5, dtype=DOUBLE), torch.zeros(2, 5)
    c = c.to(DOUBLE)
    scaled = list(weights)
    scaled[0], scaled[1] = 7 * weights[0], 4 * weights[1]
    with torch.no_grad():
        torch.testing.assert_close(
            ln_lstm_step(x, (h, c), *scaled), ln_lstm_step(x, (h, c), *weights), atol=1e-5, rtol=0
        )


def copy_cell(cell, layer, suffix):
    with torch.no_grad():
        for name, parameter in cell.named_parameters():
            parameter.copy_(getattr(layer, name + suffix))


@pytest.mark.parametrize(
    "cls, cell_cls", [(LayerNormLSTM, LayerNormLSTMCell), (LayerNormGRU, LayerNormGRUCell)]
)
def test_reference_layer_matches_a_loop_over_its_cell(cls, cell_cls):
    """Two stacked bidirectional layers, unequal lengths: the layer against cells by hand."""
    torch.manual_seed(0)
    layer = cls(3, 4, num_layers=2, bidirectional=True, dtype=DOUBLE, backend="reference")
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    lstm = cls is LayerNormLSTM
    steps, batch = 5, 3
    x = torch.randn(steps, batch, 3, dtype=DOUBLE)
    lengths = [5, 2, 4]
    output, state = layer(x, lengths=lengths)
    finals = state[0] if lstm else state
    layer_input = x
    for index in range(2):
        outputs = []
        for direction, suffix in enumerate([f"_l{index}", f"_l{index}_reverse"]):
            cell = cell_cls(layer_input.size(-1), 4, dtype=DOUBLE)
            copy_cell(cell, layer, suffix)
            out = torch.zeros(steps, batch, 4, dtype=DOUBLE)
            for b, length in enumerate(lengths):
                times = range(length) if direction == 0 else range(length - 1, -1, -1)
                hx = None
                for t in times:
                    hx = cell(layer_input[t, b : b + 1], hx)
                    out[t, b] = (hx[0] if lstm else hx)[0]
                final_h = hx[0] if lstm else hx
                torch.testing.assert_close(finals[2 * index + direction, b], final_h[0])
            outputs.append(out)
        layer_input = torch.cat(outputs, dim=-1)
    torch.testing.assert_close(output, layer_input, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_packed_input_gives_packed_output_matching_lengths(cls):
    torch.manual_seed(1)
    layer = cls(3, 4, batch_first=True, dtype=DOUBLE)
    x = torch.randn(3, 6, 3, dtype=DOUBLE)
    lengths = torch.tensor([2, 6, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    packed_out, packed_state = layer(packed)
    padded, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=6)
    output, state = layer(x, lengths=lengths)
    torch.testing.assert_close(padded, output)
    for a, b in zip(packed_state if isinstance(state, tuple) else [packed_state],
                    state if isinstance(state, tuple) else [state]):  # fmt: skip
        torch.testing.assert_close(a, b)


def test_lstm_interface_shapes_and_parameter_names():
    layer = LayerNormLSTM(3, 4, num_layers=2, bidirectional=True)
    output, (h_n, c_n) = layer(torch.randn(7, 2, 3))
    assert output.shape == (7, 2, 8) and h_n.shape == (4, 2, 4) and c_n.shape == (4, 2, 4)
    unbatched, (h_1, _) = layer(torch.randn(7, 3))
    assert unbatched.shape == (7, 8) and h_1.shape == (4, 4)
    names = {name for name, _ in layer.named_parameters()}
    expected = {"weight_ih", "weight_hh", "bias_ih", "bias_hh", "gain_ih", "gain_hh", "gain_c",
                "bias_c"}  # fmt: skip
    assert {name.split("_l")[0] for name in names} == expected
    assert "gain_c_l1_reverse" in names
    assert len(layer.all_weights) == 4 and len(layer.all_weights[0]) == 8


def test_bias_false_leaves_gains_only():
    layer = LayerNormGRU(3, 4, bias=False)
    assert sorted(name for name, _ in layer.named_parameters()) == [
        "gain_hh_l0", "gain_ih_l0", "weight_hh_l0", "weight_ih_l0",
    ]  # fmt: skip
    output, h_n = layer(torch.randn(5, 2, 3))
    assert output.shape == (5, 2, 4) and h_n.shape == (1, 2, 4)


def test_initialisation_sets_gains_to_one_and_shifts_to_zero():
    layer = LayerNormLSTM(3, 4)
    assert torch.equal(layer.gain_hh_l0, torch.ones(16)) and torch.equal(
        layer.gain_c_l0, torch.ones(4)
    )
    assert torch.equal(layer.bias_ih_l0, torch.zeros(16)) and torch.equal(
        layer.bias_c_l0, torch.zeros(4)
    )
    assert layer.weight_hh_l0.abs().max() <= 0.5


def test_given_initial_state_is_used():
    torch.manual_seed(2)
    layer = LayerNormLSTM(3, 4, dtype=DOUBLE)
    x = torch.randn(4, 2, 3, dtype=DOUBLE)
    h0, c0 = torch.randn(1, 2, 4, dtype=DOUBLE), torch.randn(1, 2, 4, dtype=DOUBLE)
    _, (h_n, _) = layer(x, (h0, c0))
    _, (h_zero, _) = layer(x)
    assert not torch.allclose(h_n, h_zero)


def test_exports_and_bad_arguments():
    assert rnnkit.LayerNormLSTM is LayerNormLSTM and rnnkit.LayerNormGRU is LayerNormGRU
    with pytest.raises(ValueError, match="hidden_size"):
        LayerNormGRU(3, 0)
    with pytest.raises(ValueError, match="input_size=3, got 5"):
        LayerNormLSTM(3, 4)(torch.randn(2, 1, 5))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        LayerNormLSTM(3, 4)(torch.randn(2, 1, 3), torch.zeros(1, 1, 4))
    with pytest.raises(TypeError, match="no torch.nn equivalent"):
        LayerNormGRU(3, 4).to_torch()


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_reference_gradcheck_tiny(cls):
    torch.manual_seed(4)
    layer = cls(2, 3, dtype=DOUBLE, backend="reference")
    x = torch.randn(3, 2, 2, dtype=DOUBLE, requires_grad=True)
    params = list(layer.parameters())

    def run(x, *_):
        output, _ = layer(x, lengths=[3, 2])
        return output

    assert torch.autograd.gradcheck(run, (x, *params))


def test_cells_run_one_step_and_match_the_step_function():
    torch.manual_seed(5)
    cell = LayerNormLSTMCell(3, 4, dtype=DOUBLE)
    x = torch.randn(2, 3, dtype=DOUBLE)
    h, c = cell(x)
    torch.testing.assert_close((h, c), ln_lstm_step(x, (torch.zeros_like(h), torch.zeros_like(c)),
                                                    *cell.step_weights()))  # fmt: skip
    gru = LayerNormGRUCell(3, 4, bias=False, dtype=DOUBLE)
    assert gru(x[0]).shape == (4,)
