"""from_torch / to_torch keep configuration and weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit


@pytest.mark.parametrize(
    "theirs",
    [
        nn.LSTM(3, 5, num_layers=2, batch_first=True, proj_size=2, bidirectional=True),
        nn.GRU(3, 5, bias=False, dropout=0.1, num_layers=2),
        nn.RNN(3, 5, nonlinearity="relu"),
        nn.LSTMCell(3, 5),
        nn.GRUCell(3, 5, bias=False),
        nn.RNNCell(3, 5, nonlinearity="relu"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip_keeps_weights_and_outputs(theirs):
    mine = rnnkit.from_torch(theirs)
    assert type(mine).__name__ == type(theirs).__name__
    back = rnnkit.to_torch(mine)
    assert type(back) is type(theirs)
    for (k1, v1), (k2, v2) in zip(theirs.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    theirs.eval(), mine.eval()
    x = torch.randn(2, 4, 3) if isinstance(theirs, nn.RNNBase) else torch.randn(2, 3)
    a, b = theirs(x), mine(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert torch.allclose(a, b, atol=1e-6)


def test_layer_method_to_torch():
    assert isinstance(rnnkit.GRU(2, 3).to_torch(), nn.GRU)


def test_reset_before_gru_has_no_torch_counterpart():
    with pytest.raises(ValueError, match="reset_after=False"):
        rnnkit.to_torch(rnnkit.GRU(2, 3, reset_after=False))
    with pytest.raises(ValueError, match="reset_after=False"):
        rnnkit.to_torch(rnnkit.GRUCell(2, 3, reset_after=False))


def test_unknown_module_is_rejected():
    with pytest.raises(TypeError, match="from_torch: module must be"):
        rnnkit.from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="to_torch: module must be"):
        rnnkit.to_torch(nn.Linear(2, 2))
