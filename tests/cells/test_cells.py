"""RNNCell, LSTMCell and GRUCell against torch.nn's cells; GRU's original form on its own."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rnnkit
from rnnkit.cells import gru_step

PAIRS = {
    "rnn_tanh": (nn.RNNCell, {}),
    "rnn_relu": (nn.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTMCell, {}),
    "gru": (nn.GRUCell, {}),
}


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(PAIRS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    input_size=st.integers(1, 5),
    hidden_size=st.integers(1, 5),
    batch=st.integers(1, 3),
    bias=st.booleans(),
    with_state=st.booleans(),
    batched=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_cell_matches_torch(
    kind, dtype, input_size, hidden_size, batch, bias, with_state, batched, seed
):
    torch.manual_seed(seed)
    cls, extra = PAIRS[kind]
    theirs = cls(input_size, hidden_size, bias=bias, dtype=dtype, **extra)
    mine = rnnkit.from_torch(theirs)
    x = torch.randn(
        (batch, input_size) if batched else (input_size,), dtype=dtype, requires_grad=True
    )
    state_shape = (batch, hidden_size) if batched else (hidden_size,)
    state = None
    if with_state:
        h = torch.randn(state_shape, dtype=dtype, requires_grad=True)
        state = (
            (h, torch.randn(state_shape, dtype=dtype, requires_grad=True)) if kind == "lstm" else h
        )
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    results = []
    for module in (mine, theirs):
        out = module(x, state)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.arange(o.numel(), dtype=dtype).reshape(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [x, *module.parameters()])
        results.append((outs, grads))
    for a, b in zip(results[0][0], results[1][0]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=tol)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_gru_reset_before_equals_reset_after_when_reset_gate_is_open():
    """With r = 1 both forms compute n = tanh(W_in x + b_in + W_hn h + b_hn)."""
    torch.manual_seed(0)
    after = rnnkit.GRUCell(3, 4, dtype=torch.float64)
    before = rnnkit.GRUCell(3, 4, reset_after=False, dtype=torch.float64)
    before.load_state_dict(after.state_dict())
    with torch.no_grad():
        for cell in (after, before):
            cell.bias_ih[:4] = 100.0  # r = sigmoid(~100) = 1
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    assert torch.allclose(after(x, h), before(x, h), atol=1e-12)
    with torch.no_grad():
        for cell in (after, before):
            cell.bias_ih[:4] = 0.0
    assert not torch.allclose(after(x, h), before(x, h), atol=1e-6)


def test_gru_reset_before_follows_cho_equations():
    torch.manual_seed(1)
    cell = rnnkit.GRUCell(3, 2, reset_after=False, dtype=torch.float64)
    x, h = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    W_ir, W_iz, W_in = cell.weight_ih.chunk(3)
    W_hr, W_hz, W_hn = cell.weight_hh.chunk(3)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    c_hr, c_hz, c_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ W_ir.T + b_ir + h @ W_hr.T + c_hr)
    z = torch.sigmoid(x @ W_iz.T + b_iz + h @ W_hz.T + c_hz)
    n = torch.tanh(x @ W_in.T + b_in + (r * h) @ W_hn.T + c_hn)
    assert torch.allclose(cell(x, h), (1 - z) * n + z * h, atol=1e-12)


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_step_gradcheck(reset_after):
    torch.manual_seed(2)
    args = [
        torch.randn(s, dtype=torch.float64, requires_grad=True)
        for s in [(2, 3), (2, 2), (6, 3), (6, 2), (6,), (6,)]
    ]

    def fn(x, h, *weights):
        return gru_step(x, (h,), *weights, reset_after=reset_after)[0]

    assert torch.autograd.gradcheck(fn, args)


def test_lstm_cell_gradcheck():
    torch.manual_seed(3)
    cell = rnnkit.LSTMCell(2, 3, dtype=torch.float64)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c)), (x, h, c))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda c: c(torch.randn(2, 5)),
            ValueError,
            r"input.size\(-1\) must be input_size=4, got 5",
        ),
        (lambda c: c(torch.randn(2, 2, 4)), ValueError, "1-D"),
        (lambda c: c(torch.randn(2, 4), torch.randn(3, 3)), TypeError, "tuple"),
        (
            lambda c: c(torch.randn(2, 4), (torch.randn(3, 3), torch.randn(2, 3))),
            ValueError,
            r"hx\[0\] must have shape \(2, 3\)",
        ),
        (lambda c: c(torch.ones(2, 4, dtype=torch.int32)), TypeError, "floating-point"),
    ],
)
def test_cell_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(rnnkit.LSTMCell(4, 3))


def test_cell_bad_constructor_arguments():
    with pytest.raises(ValueError, match="nonlinearity"):
        rnnkit.RNNCell(3, 3, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        rnnkit.GRUCell(3, 0)
