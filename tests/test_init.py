"""rnnkit.init.orthogonal_: orthogonal recurrent blocks, Xavier inputs, forget-gate bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit


def test_lstm_recurrent_blocks_are_orthogonal_and_forget_bias_is_set():
    layer = rnnkit.init.orthogonal_(
        rnnkit.LSTM(5, 8, num_layers=2, bidirectional=True), forget_bias=1.5
    )
    for name, param in layer.named_parameters():
        if name.startswith("weight_hh"):
            for block in param.detach().split(8):
                assert torch.allclose(block @ block.T, torch.eye(8), atol=1e-5)
        if name.startswith("bias_ih"):
            assert (
                torch.all(param[8:16] == 1.5)
                and torch.all(param[:8] == 0)
                and torch.all(param[16:] == 0)
            )
        if name.startswith("bias_hh"):
            assert torch.all(param == 0)


def test_works_on_cells_and_containers():
    model = nn.Sequential(rnnkit.GRUCell(3, 4))
    rnnkit.init.orthogonal_(model)
    block = model[0].weight_hh.detach()[:4]
    assert torch.allclose(block @ block.T, torch.eye(4), atol=1e-5)
    assert torch.all(model[0].bias_ih == 0)  # no forget gate in a GRU: biases stay zero


def test_rejects_modules_without_recurrent_layers():
    with pytest.raises(TypeError, match="orthogonal_"):
        rnnkit.init.orthogonal_(nn.Linear(2, 2))


def test_default_init_matches_torch_distribution():
    layer = rnnkit.RNN(3, 16)
    bound = 1 / 16**0.5
    assert all(p.abs().max() <= bound for p in layer.parameters())
