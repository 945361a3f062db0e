"""The layers under torch.autocast on the CPU: input in autocast's dtype, results in it too."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit

LAYERS = {
    "LSTM": lambda: rnnkit.LSTM(6, 8, num_layers=2, batch_first=True),
    "LSTM with projection": lambda: rnnkit.LSTM(6, 8, proj_size=5, batch_first=True),
    "GRU, bidirectional": lambda: rnnkit.GRU(6, 8, bidirectional=True, batch_first=True),
    "RNN": lambda: rnnkit.RNN(6, 8, batch_first=True),
    "LSTM with zoneout": lambda: rnnkit.LSTM(6, 8, zoneout=0.2, batch_first=True).eval(),
    "LayerNormGRU": lambda: rnnkit.LayerNormGRU(6, 8, batch_first=True),
    "MinGRU": lambda: rnnkit.MinGRU(6, 8, batch_first=True),
    "IndRNN": lambda: rnnkit.IndRNN(6, 8, batch_first=True),
    "LSTM, reference": lambda: rnnkit.LSTM(6, 8, batch_first=True, backend="reference"),
}


def _states(state) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("make_layer", LAYERS.values(), ids=LAYERS.keys())
def test_a_bfloat16_input_runs_in_float32_and_returns_bfloat16(make_layer):
    # The input comes from an autocast op; the layer computes in its weights' float32 (the CPU
    # kernels' dtype) and returns autocast's dtype: exactly its float32 results, rounded.
    torch.manual_seed(0)
    layer = make_layer()
    projection = torch.nn.Linear(4, 6)
    x = torch.randn(3, 7, 4)
    parameters = [*layer.parameters(), *projection.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        source = projection(x)
        output, state = layer(source)
    assert source.dtype == torch.bfloat16
    assert output.dtype == torch.bfloat16
    assert all(part.dtype == torch.bfloat16 for part in _states(state))
    loss = output.float().square().sum() + sum(part.float().sum() for part in _states(state))
    grads = torch.autograd.grad(loss, parameters)
    assert all(grad.dtype == torch.float32 and grad.isfinite().all() for grad in grads)

    expected_output, expected_state = layer(source.detach().float())
    torch.testing.assert_close(output, expected_output.to(torch.bfloat16), rtol=0, atol=0)
    for got, want in zip(_states(state), _states(expected_state), strict=True):
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)

    # The layer's gradients are those of the same graph without autocast: the layer on the
    # rounded input in float32, its results rounded.
    output, state = layer(source.detach().float())
    output, state = output.to(torch.bfloat16), [part.to(torch.bfloat16) for part in _states(state)]
    loss = output.float().square().sum() + sum(part.float().sum() for part in state)
    layer_parameters = list(layer.parameters())
    expected_grads = torch.autograd.grad(loss, layer_parameters)
    for got, want in zip(grads[: len(layer_parameters)], expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_close_to_torch_nn_under_autocast(cell):
    torch.manual_seed(1)
    theirs = getattr(torch.nn, cell)(6, 8, batch_first=True)
    mine = rnnkit.from_torch(theirs)
    x = torch.randn(3, 9, 6)
    h0 = torch.randn(1, 3, 8)  # float32 state beside a bfloat16 input
    hx = (h0, torch.randn(1, 3, 8)) if cell == "LSTM" else h0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        source = x.to(torch.bfloat16)
        expected, _ = theirs(source, hx)
        output, _ = mine(source, hx)
    assert output.dtype == torch.bfloat16
    # torch.nn computes in bfloat16 (its GRU in float32), rnnkit in float32.
    torch.testing.assert_close(output.float(), expected.float(), rtol=0, atol=0.03)


def test_packed_input_under_autocast_comes_back_packed_in_bfloat16():
    torch.manual_seed(2)
    layer = rnnkit.GRU(6, 8, batch_first=True)
    padded = torch.randn(3, 5, 6).to(torch.bfloat16)
    packed = pack_padded_sequence(padded, [5, 2, 4], batch_first=True, enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, h_n = layer(packed)
    assert output.data.dtype == torch.bfloat16 and h_n.dtype == torch.bfloat16
    expected, expected_h_n = layer(packed.to(torch.float32))
    torch.testing.assert_close(output.data, expected.data.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(h_n, expected_h_n.to(torch.bfloat16), rtol=0, atol=0)


def test_bad_input_is_still_named_under_autocast():
    layer = rnnkit.LSTM(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="input must be a floating-point tensor"):
            layer(torch.ones(4, 2, 6, dtype=torch.int64))
        with pytest.raises(ValueError, match="input_size=6"):
            layer(torch.randn(4, 2, 5))


def test_without_autocast_another_dtype_is_refused():
    with pytest.raises(TypeError, match="weights' dtype torch.float32, got torch.bfloat16"):
        rnnkit.LSTM(6, 8)(torch.randn(4, 2, 6, dtype=torch.bfloat16))


def test_float64_layers_are_left_alone_by_autocast():
    layer = rnnkit.GRU(6, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, h_n = layer(torch.randn(4, 2, 6, dtype=torch.float64))
    assert output.dtype == torch.float64 and h_n.dtype == torch.float64


def test_explain_backend_under_autocast_names_the_fused_kernel():
    layer = rnnkit.LSTM(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reason = rnnkit.explain_backend(layer, torch.randn(4, 2, 6, dtype=torch.bfloat16))
    assert reason == "auto: fused cpu kernel for cpu tensors"
